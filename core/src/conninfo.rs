//! libpq connection strings: parsing, validation and masking.
//!
//! `multimaster.conn_strings` holds one libpq connection string per node. mmts parses them
//! itself so that a typo is reported when the server starts (not when a receiver first
//! connects), and so that status functions can show a connection string without its password.
//!
//! Both libpq forms are accepted: `keyword=value` pairs (values may be single-quoted, with `\'`
//! and `\\` escapes) and URIs (`postgresql://user:secret@host:port/dbname?param=value`).

use std::fmt;

/// Keywords libpq (PostgreSQL 15) understands, plus `arbiter_port`, which the original
/// multimaster accepted and mmts ignores.
const KNOWN_KEYWORDS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "passfile",
    "channel_binding",
    "connect_timeout",
    "client_encoding",
    "options",
    "application_name",
    "fallback_application_name",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "replication",
    "gssencmode",
    "sslmode",
    "sslcompression",
    "sslcert",
    "sslkey",
    "sslpassword",
    "sslrootcert",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "requirepeer",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "krbsrvname",
    "gsslib",
    "target_session_attrs",
    "service",
    "arbiter_port",
];

/// Keywords whose values are secrets and are never shown.
const SECRET_KEYWORDS: &[&str] = &["password", "sslpassword"];

/// What is shown in place of a secret.
pub const MASK: &str = "********";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnInfoError {
    #[error("connection string is empty")]
    Empty,
    #[error("missing \"=\" after \"{0}\"")]
    MissingEquals(String),
    #[error("unterminated quoted string")]
    UnterminatedQuote,
    #[error("invalid connection option \"{0}\"")]
    UnknownKeyword(String),
    #[error("invalid URI: {0}")]
    BadUri(String),
    #[error("invalid port \"{0}\"")]
    BadPort(String),
}

/// A parsed connection string: its keyword/value pairs in the order written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnInfo {
    pairs: Vec<(String, String)>,
}

impl ConnInfo {
    pub fn parse(text: &str) -> Result<ConnInfo, ConnInfoError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(ConnInfoError::Empty);
        }
        let pairs = if text.starts_with("postgresql://") || text.starts_with("postgres://") {
            parse_uri(text)?
        } else {
            parse_pairs(text)?
        };
        for (key, value) in &pairs {
            if !KNOWN_KEYWORDS.contains(&key.as_str()) {
                return Err(ConnInfoError::UnknownKeyword(key.clone()));
            }
            if key == "port" && !value.split(',').all(|p| p.parse::<u16>().is_ok()) {
                return Err(ConnInfoError::BadPort(value.clone()));
            }
        }
        Ok(ConnInfo { pairs })
    }

    /// The last value given for `key` (libpq lets a later value override an earlier one).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// The connection string in `keyword=value` form with every secret replaced by [`MASK`].
    pub fn masked(&self) -> String {
        self.render(true)
    }

    fn render(&self, mask: bool) -> String {
        let mut out = String::new();
        for (key, value) in &self.pairs {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(key);
            out.push('=');
            if mask && SECRET_KEYWORDS.contains(&key.as_str()) {
                out.push_str(MASK);
            } else {
                push_quoted(&mut out, value);
            }
        }
        out
    }
}

/// The full connection string in `keyword=value` form, secrets included (for connecting).
impl fmt::Display for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(false))
    }
}

fn push_quoted(out: &mut String, value: &str) {
    let plain = !value.is_empty() && value.chars().all(|c| !c.is_whitespace() && c != '\'' && c != '\\');
    if plain {
        out.push_str(value);
        return;
    }
    out.push('\'');
    for c in value.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
}

fn parse_pairs(text: &str) -> Result<Vec<(String, String)>, ConnInfoError> {
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(ConnInfoError::MissingEquals(key));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => return Err(ConnInfoError::UnterminatedQuote),
                    Some('\\') => value.push(chars.next().ok_or(ConnInfoError::UnterminatedQuote)?),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some(escaped) = chars.next() {
                        value.push(escaped);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

fn parse_uri(text: &str) -> Result<Vec<(String, String)>, ConnInfoError> {
    let rest = text.split_once("://").map(|(_, r)| r).unwrap_or(text);
    let (main, query) = match rest.split_once('?') {
        Some((m, q)) => (m, Some(q)),
        None => (rest, None),
    };
    let (authority, dbname) = match main.split_once('/') {
        Some((a, d)) => (a, Some(d)),
        None => (main, None),
    };
    let mut pairs = Vec::new();
    let hostport = match authority.rsplit_once('@') {
        Some((userinfo, hostport)) => {
            let (user, password) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            if !user.is_empty() {
                pairs.push(("user".to_string(), percent_decode(user)?));
            }
            if let Some(p) = password {
                pairs.push(("password".to_string(), percent_decode(p)?));
            }
            hostport
        }
        None => authority,
    };
    if !hostport.is_empty() {
        let (host, port) = if let Some(bracketed) = hostport.strip_prefix('[') {
            let (h, after) = bracketed
                .split_once(']')
                .ok_or_else(|| ConnInfoError::BadUri(format!("unterminated \"[\" in \"{hostport}\"")))?;
            (h, after.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        if !host.is_empty() {
            pairs.push(("host".to_string(), percent_decode(host)?));
        }
        if let Some(port) = port {
            pairs.push(("port".to_string(), port.to_string()));
        }
    }
    if let Some(d) = dbname.filter(|d| !d.is_empty()) {
        pairs.push(("dbname".to_string(), percent_decode(d)?));
    }
    for param in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = param
            .split_once('=')
            .ok_or_else(|| ConnInfoError::BadUri(format!("missing \"=\" in parameter \"{param}\"")))?;
        pairs.push((percent_decode(k)?, percent_decode(v)?));
    }
    Ok(pairs)
}

fn percent_decode(s: &str) -> Result<String, ConnInfoError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| ConnInfoError::BadUri(format!("invalid percent-encoding in \"{s}\"")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ConnInfoError::BadUri(format!("\"{s}\" is not UTF-8")))
}

/// Splits `multimaster.conn_strings` into one connection string per node: at commas that are
/// not inside a single-quoted value.
pub fn split_conn_strings(list: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in list.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '\'' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(list[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(list[start..].trim());
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyword_value_pairs() {
        let ci = ConnInfo::parse("host=127.0.0.1 port = 5433 dbname='my db' password='it\\'s'").unwrap();
        assert_eq!(ci.get("host"), Some("127.0.0.1"));
        assert_eq!(ci.get("port"), Some("5433"));
        assert_eq!(ci.get("dbname"), Some("my db"));
        assert_eq!(ci.get("password"), Some("it's"));
        assert_eq!(ci.masked(), "host=127.0.0.1 port=5433 dbname='my db' password=********");
        assert_eq!(ConnInfo::parse(&ci.to_string()).unwrap(), ci);
    }

    #[test]
    fn uri_form() {
        let ci = ConnInfo::parse("postgresql://alice:s%40cret@db1.example:6543/app?sslmode=require").unwrap();
        assert_eq!(ci.get("user"), Some("alice"));
        assert_eq!(ci.get("password"), Some("s@cret"));
        assert_eq!(ci.get("host"), Some("db1.example"));
        assert_eq!(ci.get("port"), Some("6543"));
        assert_eq!(ci.get("dbname"), Some("app"));
        assert_eq!(ci.get("sslmode"), Some("require"));
        assert!(!ci.masked().contains("s@cret"));
        let v6 = ConnInfo::parse("postgres://[::1]:5432/x").unwrap();
        assert_eq!(v6.get("host"), Some("::1"));
    }

    #[test]
    fn errors() {
        assert_eq!(ConnInfo::parse("  "), Err(ConnInfoError::Empty));
        assert_eq!(ConnInfo::parse("host"), Err(ConnInfoError::MissingEquals("host".into())));
        assert_eq!(ConnInfo::parse("host='x"), Err(ConnInfoError::UnterminatedQuote));
        assert_eq!(ConnInfo::parse("hots=x"), Err(ConnInfoError::UnknownKeyword("hots".into())));
        assert_eq!(ConnInfo::parse("port=abc"), Err(ConnInfoError::BadPort("abc".into())));
        assert!(matches!(ConnInfo::parse("postgresql://h/%zz"), Err(ConnInfoError::BadUri(_))));
    }

    #[test]
    fn split_respects_quotes() {
        assert_eq!(
            split_conn_strings("host=a, host=b options='-c x=1,2' ,host=c"),
            vec!["host=a", "host=b options='-c x=1,2'", "host=c"]
        );
        assert_eq!(split_conn_strings(""), vec![""]);
    }
}
