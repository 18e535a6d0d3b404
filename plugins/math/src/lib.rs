//! math: a tool that evaluates arithmetic expressions (`2+3*4` is 14).
//!
//! Numbers (decimal), `+ - * /`, unary minus and parentheses, with the usual precedence.

use evhost_sdk::{Error, Tool};
use serde::{Deserialize, Serialize};

/// The input of an invocation.
#[derive(Deserialize)]
pub struct Input {
    /// The expression, e.g. `2+3*4`.
    pub expression: String,
}

/// The output of an invocation.
#[derive(Debug, Serialize)]
pub struct Output {
    /// The expression as given.
    pub expression: String,
    /// Its value; whole numbers are written without a fraction.
    pub value: serde_json::Number,
}

/// The arithmetic tool.
pub struct Math;

impl Tool for Math {
    const NAME: &'static str = "math";
    const DESCRIPTION: &'static str =
        "Evaluates an arithmetic expression with + - * /, parentheses and decimals.";
    type Input = Input;
    type Output = Output;

    fn input_schema() -> serde_json::Value {
        serde_json::json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "properties": {
                "expression": {"type": "string", "minLength": 1, "maxLength": 1000}
            },
            "required": ["expression"],
            "additionalProperties": false
        })
    }

    fn invoke(input: Input) -> Result<Output, Error> {
        let value = eval(&input.expression).map_err(Error::InvalidInput)?;
        let value = if value.fract() == 0.0 && value.abs() < 9.0e15 {
            serde_json::Number::from(value as i64)
        } else {
            serde_json::Number::from_f64(value).ok_or_else(|| {
                Error::InvalidInput(format!("{} is not a finite number", input.expression))
            })?
        };
        Ok(Output {
            expression: input.expression,
            value,
        })
    }
}

evhost_sdk::export_tool!(Math);

/// Evaluates `expr`, or says what is wrong with it.
pub fn eval(expr: &str) -> Result<f64, String> {
    let mut p = Parser {
        s: expr.as_bytes(),
        i: 0,
        depth: 0,
    };
    let v = p.sum()?;
    p.skip_ws();
    if p.i < p.s.len() {
        return Err(format!(
            "unexpected {:?} at offset {} of {expr:?}",
            p.s[p.i] as char, p.i
        ));
    }
    if !v.is_finite() {
        return Err(format!("{expr:?} has no finite value (division by zero?)"));
    }
    Ok(v)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    depth: u32,
}

impl Parser<'_> {
    fn skip_ws(&mut self) {
        while self.s.get(self.i).is_some_and(u8::is_ascii_whitespace) {
            self.i += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.s.get(self.i).copied()
    }

    fn sum(&mut self) -> Result<f64, String> {
        let mut v = self.product()?;
        while let Some(op @ (b'+' | b'-')) = self.peek() {
            self.i += 1;
            let r = self.product()?;
            v = if op == b'+' { v + r } else { v - r };
        }
        Ok(v)
    }

    fn product(&mut self) -> Result<f64, String> {
        let mut v = self.unary()?;
        while let Some(op @ (b'*' | b'/')) = self.peek() {
            self.i += 1;
            let r = self.unary()?;
            if op == b'/' && r == 0.0 {
                return Err("division by zero".into());
            }
            v = if op == b'*' { v * r } else { v / r };
        }
        Ok(v)
    }

    fn unary(&mut self) -> Result<f64, String> {
        match self.peek() {
            Some(b'-') => {
                self.i += 1;
                self.nested(|p| p.unary()).map(|v| -v)
            }
            Some(b'+') => {
                self.i += 1;
                self.nested(|p| p.unary())
            }
            Some(b'(') => {
                self.i += 1;
                let v = self.nested(|p| p.sum())?;
                if self.peek() != Some(b')') {
                    return Err(format!("missing ')' at offset {}", self.i));
                }
                self.i += 1;
                Ok(v)
            }
            Some(c) if c.is_ascii_digit() || c == b'.' => {
                let start = self.i;
                while self
                    .s
                    .get(self.i)
                    .is_some_and(|c| c.is_ascii_digit() || *c == b'.')
                {
                    self.i += 1;
                }
                let text = std::str::from_utf8(&self.s[start..self.i]).expect("ascii");
                text.parse()
                    .map_err(|_| format!("{text:?} at offset {start} is not a number"))
            }
            Some(c) => Err(format!(
                "unexpected {:?} at offset {}: expected a number, '(' or '-'",
                c as char, self.i
            )),
            None => Err("the expression ends where a number was expected".into()),
        }
    }

    fn nested(&mut self, f: impl FnOnce(&mut Self) -> Result<f64, String>) -> Result<f64, String> {
        self.depth += 1;
        if self.depth > 200 {
            return Err("the expression nests deeper than 200 levels".into());
        }
        let v = f(self);
        self.depth -= 1;
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence_parentheses_and_signs() {
        assert_eq!(eval("2+3*4"), Ok(14.0));
        assert_eq!(eval("(2+3)*4"), Ok(20.0));
        assert_eq!(eval(" -2 * -(1.5 + 0.5) "), Ok(4.0));
        assert_eq!(eval("10/4"), Ok(2.5));
    }

    #[test]
    fn bad_input_says_what_is_wrong() {
        assert!(eval("2+").unwrap_err().contains("ends"));
        assert!(eval("2+x").unwrap_err().contains("'x'"));
        assert!(eval("1/0").unwrap_err().contains("division by zero"));
        assert!(eval("(1+2").unwrap_err().contains("missing ')'"));
        assert!(eval(&"(".repeat(500)).unwrap_err().contains("deeper"));
    }

    #[test]
    fn output_writes_whole_numbers_without_fraction() {
        let out = evhost_sdk::testing::Harness::<Math>::new()
            .invoke(r#"{"expression": "2+3*4"}"#)
            .unwrap();
        assert_eq!(out, r#"{"expression":"2+3*4","value":14}"#);
        assert!(
            evhost_sdk::testing::Harness::<Math>::new()
                .invoke(r#"{"expression": "2/"}"#)
                .is_err()
        );
    }
}
