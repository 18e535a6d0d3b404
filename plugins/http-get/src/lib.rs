//! http-get: a tool that fetches a URL over wasi:http. The host sends the request only to
//! hosts its manifest grants (`[capabilities] http`); any other is denied.

use evhost_sdk::{Error, Tool};
use serde::{Deserialize, Serialize};

/// Bytes of a response body kept in the output.
const MAX_BODY: usize = 64 * 1024;

/// The input of an invocation.
#[derive(Deserialize)]
pub struct Input {
    /// `http://` or `https://` URL.
    pub url: String,
}

/// The output of an invocation.
#[derive(Debug, Serialize)]
pub struct Output {
    /// The URL fetched.
    pub url: String,
    /// HTTP status code.
    pub status: u16,
    /// Size of the body in bytes.
    pub bytes: usize,
    /// The body as text (lossy UTF-8), cut at 64 KiB.
    pub body: String,
}

/// The URL fetcher.
pub struct HttpGet;

impl Tool for HttpGet {
    const NAME: &'static str = "http-get";
    const DESCRIPTION: &'static str = "Fetches a URL with GET and returns status and body.";
    type Input = Input;
    type Output = Output;

    fn input_schema() -> serde_json::Value {
        serde_json::json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "properties": {
                "url": {"type": "string", "pattern": "^https?://[^/]+"}
            },
            "required": ["url"],
            "additionalProperties": false
        })
    }

    fn invoke(input: Input) -> Result<Output, Error> {
        let (https, rest) = match input.url.split_once("://") {
            Some(("https", rest)) => (true, rest),
            Some(("http", rest)) => (false, rest),
            _ => {
                return Err(Error::InvalidInput(format!(
                    "{} is not an http(s) URL",
                    input.url
                )));
            }
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (status, body) = get(https, authority, path)?;
        let bytes = body.len();
        let body = String::from_utf8_lossy(&body[..bytes.min(MAX_BODY)]).into_owned();
        Ok(Output {
            url: input.url,
            status,
            bytes,
            body,
        })
    }
}

evhost_sdk::export_tool!(HttpGet);

fn get(https: bool, authority: &str, path: &str) -> Result<(u16, Vec<u8>), Error> {
    use wasi::http::outgoing_handler;
    use wasi::http::types::{Fields, IncomingBody, Method, OutgoingRequest, Scheme};
    let failed = |what: &str| Error::Failed(format!("http-get: {what}"));
    let request = OutgoingRequest::new(Fields::new());
    request
        .set_method(&Method::Get)
        .map_err(|()| failed("bad method"))?;
    let scheme = if https { Scheme::Https } else { Scheme::Http };
    request
        .set_scheme(Some(&scheme))
        .map_err(|()| failed("bad scheme"))?;
    request
        .set_authority(Some(authority))
        .map_err(|()| Error::InvalidInput(format!("{authority:?} is not a valid host")))?;
    request
        .set_path_with_query(Some(path))
        .map_err(|()| Error::InvalidInput(format!("{path:?} is not a valid path")))?;
    let pending = outgoing_handler::handle(request, None)
        .map_err(|e| Error::Failed(format!("GET {authority}{path} failed: {e:?}")))?;
    pending.subscribe().block();
    let response = match pending.get() {
        Some(Ok(Ok(r))) => r,
        Some(Ok(Err(wasi::http::types::ErrorCode::HttpRequestDenied))) => {
            return Err(Error::Failed(format!(
                "GET {authority}{path} was denied: {authority} is not granted to this tool \
                 (capabilities.http)"
            )));
        }
        Some(Ok(Err(code))) => {
            return Err(Error::Failed(format!(
                "GET {authority}{path} failed: {code:?}"
            )));
        }
        _ => return Err(failed("the response was lost")),
    };
    let status = response.status();
    let body = response.consume().map_err(|()| failed("no body"))?;
    let mut buf = Vec::new();
    {
        let stream = body.stream().map_err(|()| failed("no body stream"))?;
        loop {
            match stream.blocking_read(16 * 1024) {
                Ok(chunk) => {
                    if buf.len() < 4 * MAX_BODY {
                        buf.extend_from_slice(&chunk);
                    }
                }
                Err(wasi::io::streams::StreamError::Closed) => break,
                Err(e) => return Err(Error::Failed(format!("reading the body failed: {e:?}"))),
            }
        }
    }
    let _ = IncomingBody::finish(body);
    Ok((status, buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schema_wants_a_url() {
        let schema = HttpGet::input_schema();
        assert_eq!(schema["required"][0], "url");
    }
}
