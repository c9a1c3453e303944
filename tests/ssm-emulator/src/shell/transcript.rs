//! A shell session's transcript as the agent formats it, purely: the client's Size payloads
//! (`SizeData`), the lines of streamed CloudWatch events with their ANSI sequences stripped
//! (`cloudwatchlogspublisher`, `structuredLogs`), the events of an upload at the end, and the S3
//! object key (`fileutil.BuildS3Path`).

use serde::Serialize;
use serde_json::Value;

/// Raw transcript bytes in one streamed CloudWatch event, at most.
pub(crate) const STREAMED_EVENT_BYTES: usize = 33_000;
/// Bytes in one event of an upload at the end, at most.
pub(crate) const PLAIN_EVENT_BYTES: usize = 200_000;
/// Events in one PutLogEvents call, at most.
pub(crate) const EVENTS_PER_CALL: usize = 4;

/// A Size payload (`{"cols": …, "rows": …}`) as the agent's Go decoder reads it into
/// `SizeData{Cols, Rows uint32}`: keys matched case-insensitively, missing ones 0, unknown ones
/// ignored; anything else is an error, which the agent answers by not acknowledging the
/// message at all.
pub(crate) fn parse_size(payload: &[u8]) -> Result<(u32, u32), String> {
    let value: Value = serde_json::from_slice(payload)
        .map_err(|e| format!("Size payload is not JSON ({e}): {:?}", lossy(payload)))?;
    let object = match &value {
        Value::Object(o) => o,
        Value::Null => return Ok((0, 0)),
        other => return Err(format!("Size payload {other} is not a JSON object")),
    };
    let mut size = (0, 0);
    for (key, v) in object {
        let slot = match key.to_ascii_lowercase().as_str() {
            "cols" => &mut size.0,
            "rows" => &mut size.1,
            _ => continue,
        };
        *slot = v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| format!("Size payload's {key} {v} is not a uint32"))?;
    }
    Ok(size)
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned()
}

/// `line` without its ANSI escape sequences (CSI, OSC, and two- or three-byte escapes), as
/// `ansi.Strip` leaves it.
pub(crate) fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        match chars.next() {
            // CSI: parameters and intermediates up to a final byte in @..~.
            Some('[') => {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            // OSC (and the other string sequences): up to BEL or ST (ESC \).
            Some(']' | 'P' | '^' | '_' | 'X') => {
                while let Some(c) = chars.next() {
                    if c == '\u{7}' {
                        break;
                    }
                    if c == '\u{1b}' && chars.peek() == Some(&'\\') {
                        chars.next();
                        break;
                    }
                }
            }
            // Character set designations: ESC ( B and the like.
            Some('(' | ')' | '*' | '+' | '#' | '%') => {
                chars.next();
            }
            Some(_) | None => {}
        }
    }
    out
}

/// The session facts every streamed event carries.
#[derive(Debug, Clone)]
pub(crate) struct EventContext {
    pub(crate) region: String,
    pub(crate) target: String,
    pub(crate) owner_arn: String,
    pub(crate) run_as_user: String,
    pub(crate) session_id: String,
}

/// One streamed event's message (`CloudWatchMessage`), fields in the agent's order.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StreamedMessage<'a> {
    event_version: &'static str,
    event_time: String,
    aws_region: &'a str,
    target: Target<'a>,
    user_identity: UserIdentity<'a>,
    run_as_user: &'a str,
    session_id: &'a str,
    session_data: Vec<String>,
}

#[derive(Serialize)]
struct Target<'a> {
    id: &'a str,
}

#[derive(Serialize)]
struct UserIdentity<'a> {
    arn: &'a str,
}

/// The messages of streamed events for `raw` transcript text (whole lines, or the last partial
/// line at the end): at most [`STREAMED_EVENT_BYTES`] raw bytes each, every line's ANSI
/// sequences stripped, tabs as spaces, carriage returns removed.
pub(crate) fn streamed_events(context: &EventContext, raw: &str, event_time: &str) -> Vec<String> {
    let mut events = Vec::new();
    for chunk in line_chunks(raw, STREAMED_EVENT_BYTES) {
        let cleaned = strip_ansi(chunk).replace('\t', " ").replace('\r', "");
        let mut lines: Vec<String> = cleaned.split('\n').map(str::to_owned).collect();
        if lines.last().is_some_and(String::is_empty) {
            lines.pop();
        }
        if lines.is_empty() {
            continue;
        }
        let message = StreamedMessage {
            event_version: "1.0",
            event_time: event_time.to_owned(),
            aws_region: &context.region,
            target: Target {
                id: &context.target,
            },
            user_identity: UserIdentity {
                arn: &context.owner_arn,
            },
            run_as_user: &context.run_as_user,
            session_id: &context.session_id,
            session_data: lines,
        };
        events.push(serde_json::to_string(&message).unwrap_or_default());
    }
    events
}

/// The events of an upload at the end (streaming off): the typescript as plain text, ANSI
/// sequences kept, CRLF as LF, the final newline trimmed, at most [`PLAIN_EVENT_BYTES`] each.
pub(crate) fn plain_events(typescript: &str) -> Vec<String> {
    let text = typescript.replace("\r\n", "\n");
    let text = text.strip_suffix('\n').unwrap_or(&text);
    line_chunks(text, PLAIN_EVENT_BYTES)
        .filter(|c| !c.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `text` in pieces of at most `limit` bytes, cut after a newline where one is in reach and
/// never inside a character.
fn line_chunks(text: &str, limit: usize) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut end = rest.len().min(limit);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        if end < rest.len()
            && let Some(newline) = rest[..end].rfind('\n')
        {
            end = newline + 1;
        }
        let (chunk, tail) = rest.split_at(end.max(1).min(rest.len()));
        rest = tail;
        Some(chunk)
    })
}

/// The transcript's S3 key: Go's `path.Join(prefix, "<session id>.log")` with `:` removed from
/// the file name.
pub(crate) fn s3_key(prefix: &str, session_id: &str) -> String {
    let file = format!("{}.log", session_id.replace(':', ""));
    let mut parts: Vec<&str> = Vec::new();
    for part in prefix.split('/').chain(std::iter::once(file.as_str())) {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    let joined = parts.join("/");
    if prefix.starts_with('/') {
        format!("/{joined}")
    } else {
        joined
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_the_agents_decoder_reads_them() {
        assert_eq!(parse_size(br#"{"cols":132,"rows":43}"#), Ok((132, 43)));
        assert_eq!(parse_size(br#"{"Cols":80,"extra":"x"}"#), Ok((80, 0)));
        assert_eq!(parse_size(b"null"), Ok((0, 0)));
        for bad in [
            &b"{\"cols\":-1}"[..],
            b"{\"cols\":80.5}",
            b"[80,24]",
            b"80x24",
        ] {
            assert!(parse_size(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn ansi_sequences_are_stripped_and_text_kept() {
        assert_eq!(
            strip_ansi("\u{1b}[01;32muser@host\u{1b}[00m:~$ ls"),
            "user@host:~$ ls"
        );
        assert_eq!(strip_ansi("\u{1b}]0;title\u{7}prompt$ "), "prompt$ ");
        assert_eq!(strip_ansi("\u{1b}]0;t\u{1b}\\x\u{1b}(By"), "xy");
        assert_eq!(strip_ansi("plain"), "plain");
    }

    #[test]
    fn streamed_events_carry_the_sessions_facts_and_clean_lines() {
        let context = EventContext {
            region: "us-east-1".into(),
            target: "i-0123456789abcdef0".into(),
            owner_arn: "arn:aws:iam::123456789012:user/alice".into(),
            run_as_user: "ssm-user".into(),
            session_id: "alice-0123".into(),
        };
        let events = streamed_events(&context, "$ echo\thi\r\n\u{1b}[1mhi\u{1b}[0m\r\n", "T");
        assert_eq!(
            events,
            vec![
                r#"{"eventVersion":"1.0","eventTime":"T","awsRegion":"us-east-1","target":{"id":"i-0123456789abcdef0"},"userIdentity":{"arn":"arn:aws:iam::123456789012:user/alice"},"runAsUser":"ssm-user","sessionId":"alice-0123","sessionData":["$ echo hi","hi"]}"#
            ]
        );
        let long = "x".repeat(STREAMED_EVENT_BYTES) + "\nlast\n";
        assert_eq!(streamed_events(&context, &long, "T").len(), 2);
    }

    #[test]
    fn plain_events_keep_the_text_in_pieces() {
        assert_eq!(plain_events("a\r\nb\n"), vec!["a\nb"]);
        let big = "y".repeat(PLAIN_EVENT_BYTES + 10);
        let events = plain_events(&big);
        assert_eq!(events.len(), 2);
        assert_eq!(events.concat(), big);
    }

    #[test]
    fn the_s3_key_joins_the_prefix_and_the_session() {
        assert_eq!(s3_key("", "alice-01"), "alice-01.log");
        assert_eq!(s3_key("ssm/", "alice-01"), "ssm/alice-01.log");
        assert_eq!(s3_key("a//b/./", "x:y"), "a/b/xy.log");
    }
}
