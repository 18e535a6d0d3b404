//! orchestrator: a tool-using agent as an extractor, keyed by correlation id.
//!
//! `user.query.received {"query"}` -> `plan.generated` and one `tool.invocation.requested`
//! per step -> (the tools answer) -> `answer.synthesized` once every step has an outcome.
//! The planner is a rule: arithmetic in the query goes to `math`, each URL to `http-get`.
//! Everything it remembers lives in the flow's state, so after a crash the host replays it
//! from the log and the flow carries on.

use evhost_sdk::{Error, Event, Extractor, NewEvent};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// One step of a plan: a tool invocation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// Its id: `<correlation id>/<step number>`.
    pub invocation_id: String,
    /// The tool to invoke.
    pub tool: String,
    /// The tool's input.
    pub input: Value,
    /// The outcome: `{"output": ...}` or `{"error": ...}`, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Value>,
}

/// The state of one flow.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Flow {
    /// The user's query.
    pub query: String,
    /// The plan.
    pub steps: Vec<Step>,
    /// True once the answer was emitted.
    pub answered: bool,
}

#[derive(Deserialize)]
struct Query {
    query: String,
}

#[derive(Deserialize)]
struct Outcome {
    invocation_id: String,
    #[serde(default)]
    output: Option<Value>,
    #[serde(default)]
    error: Option<Value>,
}

/// The planning rule: which tools a query needs, with their inputs.
pub fn plan(query: &str) -> Vec<(String, Value)> {
    let mut steps = Vec::new();
    for word in query.split_whitespace() {
        let url = word.trim_end_matches(['.', ',', '?', '!', ')']);
        if url.starts_with("http://") || url.starts_with("https://") {
            steps.push(("http-get".to_owned(), json!({ "url": url })));
        }
    }
    let without_urls: Vec<&str> = query
        .split_whitespace()
        .filter(|w| !w.contains("://"))
        .collect();
    if let Some(expression) = arithmetic(&without_urls.join(" ")) {
        steps.push(("math".to_owned(), json!({ "expression": expression })));
    }
    steps
}

/// The longest run of arithmetic characters in `query` holding a digit and an operator.
fn arithmetic(query: &str) -> Option<String> {
    let is_math = |c: char| c.is_ascii_digit() || "+-*/(). ".contains(c);
    let mut best: Option<String> = None;
    let mut run = String::new();
    for c in query.chars().chain(std::iter::once('\n')) {
        if is_math(c) {
            run.push(c);
            continue;
        }
        let candidate = run.trim().trim_end_matches(['.', ' ']).to_owned();
        let has_op = candidate.chars().skip(1).any(|c| "+-*/".contains(c));
        if has_op
            && candidate.chars().any(|c| c.is_ascii_digit())
            && best.as_ref().is_none_or(|b| candidate.len() > b.len())
        {
            best = Some(candidate);
        }
        run.clear();
    }
    best
}

/// The answer text from the finished steps.
pub fn answer(flow: &Flow) -> String {
    if flow.steps.is_empty() {
        return format!("I have no tool for {:?}.", flow.query);
    }
    let parts: Vec<String> = flow
        .steps
        .iter()
        .map(|s| {
            let outcome = s.outcome.clone().unwrap_or(Value::Null);
            match (s.tool.as_str(), outcome.get("output"), outcome.get("error")) {
                ("math", Some(out), _) => {
                    format!(
                        "{} = {}",
                        s.input["expression"].as_str().unwrap_or("?"),
                        out["value"]
                    )
                }
                ("http-get", Some(out), _) => format!(
                    "{} answered {} with {} bytes",
                    s.input["url"].as_str().unwrap_or("?"),
                    out["status"],
                    out["bytes"]
                ),
                (tool, _, Some(err)) => format!(
                    "{tool} failed: {}",
                    err["message"].as_str().unwrap_or("unknown error")
                ),
                (tool, _, _) => format!("{tool} gave no result"),
            }
        })
        .collect();
    parts.join("; ")
}

/// The orchestrating agent.
pub struct Orchestrator;

impl Extractor for Orchestrator {
    type State = Flow;

    fn key(event: &Event) -> Result<Option<String>, Error> {
        Ok(event.correlation_id().map(|c| format!("flow/{c}")))
    }

    fn extract(flow: &mut Flow, event: &Event, out: &mut Vec<NewEvent>) -> Result<(), Error> {
        let Some(correlation) = event.correlation_id() else {
            // Not part of a flow: nothing to orchestrate.
            return Ok(());
        };
        match &*event.event_type {
            "user.query.received" => {
                if !flow.steps.is_empty() || !flow.query.is_empty() {
                    return Ok(()); // A repeated query of a flow already planned.
                }
                let q: Query = event.payload()?;
                flow.query = q.query;
                flow.steps = plan(&flow.query)
                    .into_iter()
                    .enumerate()
                    .map(|(i, (tool, input))| Step {
                        invocation_id: format!("{correlation}/{}", i + 1),
                        tool,
                        input,
                        outcome: None,
                    })
                    .collect();
                out.push(NewEvent::new(
                    "plan.generated",
                    &event.stream,
                    &json!({ "query": flow.query, "steps": flow.steps }),
                )?);
                for s in &flow.steps {
                    out.push(NewEvent::new(
                        "tool.invocation.requested",
                        &event.stream,
                        &json!({ "invocation_id": s.invocation_id, "tool": s.tool, "input": s.input }),
                    )?);
                }
            }
            _ => {
                let o: Outcome = event.payload()?;
                let Some(step) = flow
                    .steps
                    .iter_mut()
                    .find(|s| s.invocation_id == o.invocation_id)
                else {
                    return Ok(()); // Some other caller's invocation.
                };
                if step.outcome.is_some() {
                    return Ok(());
                }
                step.outcome = Some(match (o.output, o.error) {
                    (Some(output), _) => json!({ "output": output }),
                    (None, error) => json!({ "error": error.unwrap_or(Value::Null) }),
                });
            }
        }
        if !flow.answered && flow.steps.iter().all(|s| s.outcome.is_some()) {
            flow.answered = true;
            out.push(NewEvent::new(
                "answer.synthesized",
                &event.stream,
                &json!({ "query": flow.query, "answer": answer(flow), "steps": flow.steps }),
            )?);
        }
        Ok(())
    }
}

evhost_sdk::export_extractor!(Orchestrator);

#[cfg(test)]
mod tests {
    use super::*;
    use evhost_sdk::testing::Harness;

    #[test]
    fn plans_math_and_urls() {
        assert_eq!(
            plan("what is 2+3*4?"),
            vec![("math".to_owned(), json!({"expression": "2+3*4"}))]
        );
        assert_eq!(plan("fetch http://127.0.0.1:9/x please")[0].0, "http-get");
        assert!(plan("hello there").is_empty());
        assert!(plan("in 2024 we").is_empty());
        assert_eq!(plan("get http://127.0.0.1:8931/a-b/1.2 now").len(), 1);
    }

    #[test]
    fn a_flow_runs_from_query_to_answer() {
        let mut h = Harness::<Orchestrator>::new();
        let q = Event::new("user.query.received", r#"{"query": "what is 2+3*4"}"#)
            .with_stream("chat")
            .with_meta("correlation_id", "c1");
        let out = h.extract(vec![q.clone()]).unwrap();
        let types: Vec<_> = out[0].iter().map(|e| e.event_type.as_str()).collect();
        assert_eq!(types, ["plan.generated", "tool.invocation.requested"]);
        assert_eq!(out[0][1].json()["invocation_id"], "c1/1");
        // The same query again plans nothing new.
        assert!(h.extract(vec![q]).unwrap()[0].is_empty());
        let done = Event::new(
            "tool.invocation.completed",
            r#"{"invocation_id": "c1/1", "output": {"value": 14}}"#,
        )
        .with_meta("correlation_id", "c1");
        let out = h.extract(vec![done.clone()]).unwrap();
        assert_eq!(out[0][0].event_type, "answer.synthesized");
        assert!(out[0][0].json()["answer"].as_str().unwrap().contains("14"));
        // A duplicate outcome answers nothing twice.
        assert!(h.extract(vec![done]).unwrap()[0].is_empty());
    }

    #[test]
    fn a_query_without_tools_is_answered_at_once() {
        let q = Event::new("user.query.received", r#"{"query": "hello"}"#)
            .with_meta("correlation_id", "c2");
        let out = Harness::<Orchestrator>::new().extract(vec![q]).unwrap();
        let types: Vec<_> = out[0].iter().map(|e| e.event_type.as_str()).collect();
        assert_eq!(types, ["plan.generated", "answer.synthesized"]);
    }
}
