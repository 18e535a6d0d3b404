//! Who may do what over HTTP: bearer tokens with roles, and the checks that keep a web page
//! from driving the API (the `Host` header against DNS rebinding, the `Origin` header
//! against cross-site requests, JSON-only bodies against plain HTML forms).
//!
//! Every request passes [`guard`] before any handler runs, in this order: `Host` (421),
//! `Origin` (403), the token (401 / 403), the body's type (415). A refused request has
//! done nothing.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::ApiError;

/// What a token lets its holder do. Each role covers the ones before it: `append` may also
/// read, `admin` may do everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Reads, subscriptions, waits, status, state reads and queries.
    Read,
    /// Appends, and everything `read` may do.
    Append,
    /// Plugins, schemas, dead letters, resume, stream archive and delete, and the rest.
    Admin,
}

impl Role {
    /// The role's name as written in a tokens file.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Append => "append",
            Role::Admin => "admin",
        }
    }

    fn parse(s: &str) -> Option<Role> {
        match s {
            "read" => Some(Role::Read),
            "append" => Some(Role::Append),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    /// The role a request needs: reads need `read`, appends `append`, anything else that
    /// changes the host `admin`.
    pub fn needed_for(method: &Method, path: &str) -> Role {
        if method == Method::GET || method == Method::HEAD {
            return Role::Read;
        }
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (method, parts.as_slice()) {
            (&Method::POST, ["v1", "events"]) | (&Method::POST, ["v1", "streams", _]) => {
                Role::Append
            }
            (&Method::POST, ["v1", "projections", _, "query"]) => Role::Read,
            _ => Role::Admin,
        }
    }
}

/// Fewest bytes a token may have: shorter ones can be guessed.
pub(super) const MIN_TOKEN_BYTES: usize = 16;

/// The tokens the host accepts, kept only as SHA-256 digests, each with its role.
#[derive(Clone, Default)]
pub struct Tokens {
    digests: Vec<([u8; 32], Role)>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} configured)", self.digests.len())
    }
}

/// Why a token or a tokens file was refused.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TokenError(String);

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Tokens {
    /// No tokens: every request is allowed (the default on loopback).
    pub fn none() -> Self {
        Self::default()
    }

    /// True when no token is configured, so requests are not authenticated.
    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Adds `token` with `role`.
    pub fn add(&mut self, token: &str, role: Role) -> Result<(), TokenError> {
        let token = token.trim();
        if token.len() < MIN_TOKEN_BYTES {
            return Err(TokenError(format!(
                "a token must have at least {MIN_TOKEN_BYTES} characters (this one has {}); generate one with `openssl rand -hex 32`",
                token.len()
            )));
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(TokenError(
                "a token must not contain spaces or control characters".into(),
            ));
        }
        let d = digest(token);
        if self.digests.iter().any(|(have, _)| *have == d) {
            return Err(TokenError("the same token is configured twice".into()));
        }
        self.digests.push((d, role));
        Ok(())
    }

    /// Reads a tokens file: one `TOKEN ROLE` per line (`read`, `append` or `admin`); blank
    /// lines and lines starting with `#` are skipped.
    pub fn parse_file(text: &str, path: &Path) -> Result<Self, TokenError> {
        let mut tokens = Tokens::default();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = |m: String| TokenError(format!("{} line {}: {m}", path.display(), i + 1));
            let mut words = line.split_whitespace();
            let (Some(token), Some(role), None) = (words.next(), words.next(), words.next()) else {
                return Err(at(
                    "expected `TOKEN ROLE`, with ROLE one of read, append, admin".into(),
                ));
            };
            let role = Role::parse(role)
                .ok_or_else(|| at(format!("unknown role {role:?}; use read, append or admin")))?;
            tokens.add(token, role).map_err(|e| at(e.0))?;
        }
        if tokens.is_empty() {
            return Err(TokenError(format!(
                "{} holds no tokens; add lines of `TOKEN ROLE`",
                path.display()
            )));
        }
        Ok(tokens)
    }

    /// The role of `token`, comparing it with every configured token in constant time.
    fn role_of(&self, token: &str) -> Option<Role> {
        let d = digest(token);
        let mut found = None;
        for (have, role) in &self.digests {
            if bool::from(have.ct_eq(&d)) {
                found = Some(*role);
            }
        }
        found
    }
}

/// Which `Host` headers name this host.
#[derive(Debug, Clone)]
pub struct AllowedHosts {
    listen: SocketAddr,
    names: Vec<String>,
}

impl AllowedHosts {
    /// The hosts a server on `listen` answers to, plus `names` (`--allow-host`, with or
    /// without a port).
    pub fn new(listen: SocketAddr, names: Vec<String>) -> Self {
        Self {
            listen,
            names: names.into_iter().map(|n| n.to_ascii_lowercase()).collect(),
        }
    }

    /// True when `host` (a `Host` header's value, any port) names this server: the listen
    /// address;
    /// `localhost` or any loopback address when it listens on loopback; any IP address when
    /// it listens on all of them (an IP literal cannot be rebound); or a configured name.
    fn admits(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        if self.names.iter().any(|n| *n == host) {
            return true;
        }
        // Only the name matters against rebinding: a port cannot be rebound, and proxies
        // and port forwards change it.
        let name = host_name(&host);
        if self.names.iter().any(|n| *n == name) {
            return true;
        }
        let ip = name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .ok();
        let listen_ip = self.listen.ip();
        match ip {
            Some(ip) if ip == listen_ip => true,
            Some(_) if listen_ip.is_unspecified() => true,
            Some(ip) => listen_ip.is_loopback() && ip.is_loopback(),
            // `localhost` always resolves to loopback in browsers, so it cannot be rebound.
            None => (listen_ip.is_loopback() || listen_ip.is_unspecified()) && name == "localhost",
        }
    }
}

/// The name of `host:port` (and of `[v6]:port`), without the port.
fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |i| &host[..=i]);
    }
    match host.rsplit_once(':') {
        Some((name, _)) if !name.contains(':') => name,
        _ => host,
    }
}

/// An origin as compared: lower case, without a trailing `/`.
fn normalized_origin(origin: &str) -> String {
    origin.trim_end_matches('/').to_ascii_lowercase()
}

/// The front door's policy: tokens, hosts and origins.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// Tokens and their roles; none means no authentication.
    pub tokens: Tokens,
    /// Which `Host` headers are answered; `None` checks none (an API embedded in a
    /// process, not listening for browsers).
    pub hosts: Option<AllowedHosts>,
    /// Origins (`scheme://host[:port]`) whose pages may call the API (`--allow-origin`).
    pub origins: Vec<String>,
}

impl Access {
    /// The origin-bound checks of a server on `listen` with `tokens`, answering the extra
    /// `hosts` names and the pages of `origins`.
    pub fn for_listener(
        listen: SocketAddr,
        tokens: Tokens,
        hosts: Vec<String>,
        origins: Vec<String>,
    ) -> Self {
        Self {
            tokens,
            hosts: Some(AllowedHosts::new(listen, hosts)),
            origins: origins.into_iter().map(|o| normalized_origin(&o)).collect(),
        }
    }

    fn check(&self, req: &Request) -> Result<(), ApiError> {
        let headers = req.headers();
        for name in [header::HOST, header::ORIGIN, header::AUTHORIZATION] {
            if headers.get_all(&name).iter().count() > 1 {
                return Err(ApiError::bad_request(
                    "duplicate_header",
                    format!("the request has more than one {name} header; send one"),
                ));
            }
        }
        let host = match headers.get(header::HOST) {
            Some(h) => Some(h.to_str().map(str::to_owned).map_err(|_| {
                ApiError::bad_request("bad_header", "the Host header is not readable text")
            })?),
            None => req.uri().authority().map(|a| a.to_string()),
        };
        if let Some(allowed) = &self.hosts {
            match host.as_deref() {
                Some(h) if allowed.admits(h) => {}
                Some(h) => {
                    return Err(ApiError::new(
                        StatusCode::MISDIRECTED_REQUEST,
                        "unknown_host",
                        format!(
                            "this host does not answer to the name {h:?}; address it by its listen address, or start it with --allow-host NAME"
                        ),
                    ));
                }
                None => {
                    return Err(ApiError::new(
                        StatusCode::MISDIRECTED_REQUEST,
                        "unknown_host",
                        "the request has no Host header; send one naming this host",
                    ));
                }
            }
        }
        if let Some(origin) = headers.get(header::ORIGIN) {
            self.check_origin(origin, host.as_deref())?;
            if req.method() == Method::OPTIONS {
                // A preflight from an allowed origin carries no token; it is answered by
                // `guard` without reaching a handler.
                return Ok(());
            }
        }
        if !self.tokens.is_empty() && !super::dashboard::is_asset(req.method(), req.uri().path()) {
            let needed = Role::needed_for(req.method(), req.uri().path());
            let role = self.role(headers)?;
            if role < needed {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    format!(
                        "this token's role is {}; {} {} needs a token with role {} or above",
                        role.as_str(),
                        req.method(),
                        req.uri().path(),
                        needed.as_str()
                    ),
                )
                .with("role", json!(role.as_str()))
                .with("needed", json!(needed.as_str())));
            }
        }
        check_content_type(req)
    }

    fn check_origin(&self, origin: &HeaderValue, host: Option<&str>) -> Result<(), ApiError> {
        let origin = origin.to_str().unwrap_or("");
        let lower = normalized_origin(origin);
        let own = self.hosts.is_some()
            && host.is_some_and(|h| lower == format!("http://{}", h.to_ascii_lowercase()));
        if own || self.origins.iter().any(|o| *o == lower) {
            return Ok(());
        }
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "origin_refused",
            format!(
                "requests from pages of {origin:?} are refused: a web page may call this API only from an origin given to --allow-origin"
            ),
        ))
    }

    fn role(&self, headers: &HeaderMap) -> Result<Role, ApiError> {
        let unauthorized =
            |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m.to_owned());
        let value = headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| {
                unauthorized(
                    "this host needs a token: send `Authorization: Bearer TOKEN` (the CLI takes --token or EVHOST_TOKEN)",
                )
            })?
            .to_str()
            .map_err(|_| unauthorized("the Authorization header is not readable text"))?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or_else(|| unauthorized("the Authorization header must be `Bearer TOKEN`"))?;
        self.tokens
            .role_of(token.trim())
            .ok_or_else(|| unauthorized("the token is not one this host accepts"))
    }
}

/// POST and PUT bodies must be JSON (multipart for a plugin upload): an HTML form can send
/// only `text/plain`, form encoding or multipart, and only with POST. A request with no body
/// at all needs no type.
fn check_content_type(req: &Request) -> Result<(), ApiError> {
    let method = req.method();
    if method != Method::POST && method != Method::PUT {
        return Ok(());
    }
    let headers = req.headers();
    let upload = method == Method::PUT && req.uri().path().starts_with("/v1/plugins/");
    let wanted = if upload {
        "multipart/form-data"
    } else {
        "application/json"
    };
    let Some(ct) = headers.get(header::CONTENT_TYPE) else {
        let empty = !headers.contains_key(header::TRANSFER_ENCODING)
            && headers
                .get(header::CONTENT_LENGTH)
                .is_none_or(|l| l.as_bytes() == b"0");
        if empty {
            return Ok(());
        }
        return Err(unsupported(wanted, "no Content-Type"));
    };
    let essence = ct
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if essence == wanted {
        Ok(())
    } else {
        Err(unsupported(wanted, &format!("Content-Type {essence:?}")))
    }
}

fn unsupported(wanted: &str, got: &str) -> ApiError {
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        format!("the body must be sent as {wanted}, not with {got}"),
    )
    .with("expected", json!(wanted))
}

impl Access {
    /// The origin of `req` when it is one listed with `--allow-origin` (a page of another
    /// origin, which needs CORS headers to read the reply), as the request spelled it.
    fn listed_origin(&self, req: &Request) -> Option<HeaderValue> {
        let origin = req.headers().get(header::ORIGIN)?;
        let lower = normalized_origin(origin.to_str().ok()?);
        self.origins.contains(&lower).then(|| origin.clone())
    }
}

/// The CORS headers that let a page of `origin` read the reply.
fn allow_origin(resp: &mut Response, origin: HeaderValue) {
    let h = resp.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.append(header::VARY, HeaderValue::from_static("Origin"));
}

/// The middleware that applies an [`Access`] policy to every request. Pages of an origin
/// given to `--allow-origin` get CORS: their preflights are answered (with no token, as
/// browsers send them) and their replies carry `Access-Control-Allow-Origin`.
pub(super) async fn guard(State(access): State<Arc<Access>>, req: Request, next: Next) -> Response {
    match access.check(&req) {
        Ok(()) if req.method() == Method::OPTIONS && req.headers().contains_key(header::ORIGIN) => {
            let mut resp = StatusCode::NO_CONTENT.into_response();
            if let Some(origin) = access.listed_origin(&req) {
                allow_origin(&mut resp, origin);
                let h = resp.headers_mut();
                h.insert(
                    header::ACCESS_CONTROL_ALLOW_METHODS,
                    HeaderValue::from_static("GET, POST, PUT, DELETE"),
                );
                h.insert(
                    header::ACCESS_CONTROL_ALLOW_HEADERS,
                    HeaderValue::from_static("authorization, content-type, last-event-id"),
                );
                h.insert(
                    header::ACCESS_CONTROL_MAX_AGE,
                    HeaderValue::from_static("600"),
                );
            }
            resp
        }
        Ok(()) => {
            let listed = access.listed_origin(&req);
            let mut resp = next.run(req).await;
            if let Some(origin) = listed {
                allow_origin(&mut resp, origin);
            }
            resp
        }
        Err(e) => {
            let unauthorized = e.status() == StatusCode::UNAUTHORIZED;
            let mut resp = e.into_response();
            if unauthorized {
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"evhost\""),
                );
            }
            resp
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_needed_by_route() {
        let r = |m: Method, p: &str| Role::needed_for(&m, p);
        assert_eq!(r(Method::GET, "/v1/events"), Role::Read);
        assert_eq!(r(Method::GET, "/v1/subscribe"), Role::Read);
        assert_eq!(r(Method::POST, "/v1/events"), Role::Append);
        assert_eq!(r(Method::POST, "/v1/streams/orders-1"), Role::Append);
        assert_eq!(r(Method::POST, "/v1/projections/p/query"), Role::Read);
        assert_eq!(r(Method::POST, "/v1/streams/orders-1/archive"), Role::Admin);
        assert_eq!(r(Method::DELETE, "/v1/streams/orders-1"), Role::Admin);
        assert_eq!(r(Method::PUT, "/v1/plugins/p"), Role::Admin);
        assert_eq!(r(Method::POST, "/v1/plugins/p/resume"), Role::Admin);
        assert_eq!(r(Method::PUT, "/v1/schemas/a.b"), Role::Admin);
        assert_eq!(r(Method::DELETE, "/v1/dlq/x.1"), Role::Admin);
        assert!(Role::Admin > Role::Append && Role::Append > Role::Read);
    }

    #[test]
    fn tokens_file_and_lookup() {
        let p = Path::new("tokens");
        let t = Tokens::parse_file(
            "# ops\nreader-token-0123456789 read\n\nwriter-token-0123456789 append\nadmin-token-01234567890 admin\n",
            p,
        )
        .unwrap();
        assert_eq!(t.role_of("reader-token-0123456789"), Some(Role::Read));
        assert_eq!(t.role_of("writer-token-0123456789"), Some(Role::Append));
        assert_eq!(t.role_of("admin-token-01234567890"), Some(Role::Admin));
        assert_eq!(t.role_of("admin-token-0123456789"), None);
        let e = Tokens::parse_file("short read\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1") && e.contains("at least 16"), "{e}");
        let e = Tokens::parse_file("reader-token-0123456789 owner\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown role \"owner\""), "{e}");
        assert!(Tokens::parse_file("# nothing\n", p).is_err());
        assert!(
            !format!("{t:?}").contains("reader-token"),
            "tokens are never printed"
        );
    }

    #[test]
    fn hosts_that_name_a_loopback_listener() {
        let a = AllowedHosts::new(
            "127.0.0.1:7700".parse().unwrap(),
            vec!["evhost.internal".into()],
        );
        for ok in [
            "127.0.0.1:7700",
            "localhost:7700",
            "LOCALHOST:7700",
            "[::1]:7700",
            "evhost.internal",
            "evhost.internal:443",
            "localhost:8080",
            "127.0.0.1",
        ] {
            assert!(a.admits(ok), "{ok}");
        }
        for bad in [
            "evil.example:7700",
            "10.0.0.1:7700",
            "localhost.evil.example:7700",
            "127.0.0.1.nip.io:7700",
            "",
        ] {
            assert!(!a.admits(bad), "{bad}");
        }
        let any = AllowedHosts::new("0.0.0.0:7700".parse().unwrap(), vec![]);
        assert!(any.admits("192.168.1.20:7700"));
        assert!(!any.admits("rebound.example:7700"));
        assert!(any.admits("localhost:7700"));
    }
}
