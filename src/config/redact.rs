//! Redaction: the passwords of a connection string hidden, in every form assetflow or libpq
//! accepts, before the string is shown or logged.

/// redact_url hides the passwords in a connection string, in every form assetflow accepts or
/// libpq does: the user info of a URL (`amqp://user:secret@host/`), `password` and `sslpassword`
/// query parameters (`postgres://h/db?password=secret`), and the `password` and `sslpassword`
/// keys of a libpq `key=value` string (`host=h password='se cret'`). Whatever it cannot read is
/// hidden whole rather than shown.
pub fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            // The user info ends at the last `@` before the query. A password with an unencoded
            // `?` or `#` (invalid, but typed by people) still ends at an `@` with no `/` before it.
            let query_at = rest.find(['?', '#']).unwrap_or(rest.len());
            let at = rest[..query_at].rfind('@').or_else(|| rest.rfind('@').filter(|&at| !rest[..at].contains('/')));
            let (userinfo, host) = match at {
                Some(at) => {
                    let userinfo = &rest[..at];
                    match userinfo.split_once(':') {
                        Some((user, _)) => (format!("{user}:***"), &rest[at..]),
                        None => (userinfo.to_string(), &rest[at..]),
                    }
                }
                None => (String::new(), rest),
            };
            let (host, query) = host.split_at(host.find(['?', '#']).unwrap_or(host.len()));
            format!("{scheme}://{userinfo}{host}{}", redact_query(query))
        }
        None if url.contains('=') => redact_key_values(url).unwrap_or_else(|| "*** (unreadable, hidden)".to_string()),
        None => url.to_string(),
    }
}

/// is_secret_key says whether a connection parameter holds a secret.
fn is_secret_key(key: &str) -> bool {
    let key = key.trim().to_ascii_lowercase();
    key == "password" || key == "sslpassword" || key == "passwd" || key == "pass"
}

/// redact_query masks the values of secret parameters in `?a=b&password=c#frag`.
fn redact_query(query: &str) -> String {
    let Some(params) = query.strip_prefix('?') else {
        return query.to_string();
    };
    let (params, fragment) = match params.find('#') {
        Some(i) => params.split_at(i),
        None => (params, ""),
    };
    let params: Vec<String> = params
        .split('&')
        .map(|param| match param.split_once('=') {
            Some((key, _)) if is_secret_key(&percent_decoded(key)) => format!("{key}=***"),
            _ => param.to_string(),
        })
        .collect();
    format!("?{}{fragment}", params.join("&"))
}

fn percent_decoded(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(byte) = s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// redact_key_values masks the secret values of a libpq keyword/value connection string
/// (`host=h password = 'it''s \' secret' dbname=x`); None when it is not one.
fn redact_key_values(dsn: &str) -> Option<String> {
    let chars: Vec<char> = dsn.chars().collect();
    let mut out = String::with_capacity(dsn.len());
    let mut i = 0;
    let skip_spaces = |i: &mut usize, out: &mut String| {
        while *i < chars.len() && chars[*i].is_whitespace() {
            out.push(chars[*i]);
            *i += 1;
        }
    };
    loop {
        skip_spaces(&mut i, &mut out);
        if i == chars.len() {
            return Some(out);
        }
        let start = i;
        while i < chars.len() && chars[i] != '=' && !chars[i].is_whitespace() {
            i += 1;
        }
        let key: String = chars[start..i].iter().collect();
        out.push_str(&key);
        skip_spaces(&mut i, &mut out);
        if key.is_empty() || chars.get(i) != Some(&'=') {
            return None;
        }
        out.push('=');
        i += 1;
        skip_spaces(&mut i, &mut out);
        let value_start = i;
        if chars.get(i) == Some(&'\'') {
            i += 1;
            loop {
                match chars.get(i) {
                    None => return None,
                    Some('\\') => i += 2,
                    Some('\'') => {
                        i += 1;
                        break;
                    }
                    Some(_) => i += 1,
                }
            }
        } else {
            while i < chars.len() && !chars[i].is_whitespace() {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
        }
        let i_end = i.min(chars.len());
        i = i_end;
        if is_secret_key(&key) {
            out.push_str("***");
        } else {
            out.extend(&chars[value_start..i_end]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_of_password_is_redacted() {
        let cases = [
            ("amqps://u:pa/ss@h:5671/vh", "amqps://u:***@h:5671/vh"),
            ("amqp://u:p@ss@h/", "amqp://u:***@h/"),
            ("amqp://u:pa#ss@h/vh", "amqp://u:***@h/vh"),
            ("amqp://u:p?ss@h/vh?heartbeat=5", "amqp://u:***@h/vh?heartbeat=5"),
            (
                "postgres://u:secret@h/db?sslmode=verify-full&password=two",
                "postgres://u:***@h/db?sslmode=verify-full&password=***",
            ),
            ("postgres://h/db?PassWord=x#frag", "postgres://h/db?PassWord=***#frag"),
            ("postgres://h/db?pass%77ord=x&sslpassword=y", "postgres://h/db?pass%77ord=***&sslpassword=***"),
            ("host=h user=u password=secret dbname=db", "host=h user=u password=*** dbname=db"),
            ("host=h password = 'se cr\\'et' sslmode=require", "host=h password = *** sslmode=require"),
            ("password=secret", "password=***"),
            ("host=h sslpassword=s dbname=d", "host=h sslpassword=*** dbname=d"),
            ("host=h password='unterminated", "*** (unreadable, hidden)"),
            ("postgres://postgres@127.0.0.1/x", "postgres://postgres@127.0.0.1/x"),
        ];
        for (url, shown) in cases {
            assert_eq!(redact_url(url), shown, "{url}");
        }
        for secret in ["secret", "two", "se cr"] {
            for (url, _) in cases {
                if url.contains(secret) {
                    assert!(!redact_url(url).contains(secret), "{url}");
                }
            }
        }
    }
}
