//! Guest-derived text made safe to print: a tenant's console can carry any bytes, and an ESC
//! or a bidirectional override reaching the operator's terminal would let it rewrite what the
//! operator sees.

use std::borrow::Cow;
use std::fmt::Write;

/// `s` with every control character (C0, DEL, C1) and every bidirectional-text control
/// (U+200E/F, U+202A-E, U+2066-9) written as an escape (`\x1b`, `\u{202e}`). Text without
/// any is returned as it is; escaping twice changes nothing more.
pub fn escape_control(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            c if (c as u32) < 0x80 && c.is_control() => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_escaped_and_plain_text_is_kept() {
        assert!(matches!(
            escape_control("GPU has fallen off the bus"),
            Cow::Borrowed(_)
        ));
        assert_eq!(escape_control("a\u{1b}[2Jb"), "a\\x1b[2Jb");
        assert_eq!(escape_control("line\nnext\r\t"), "line\\x0anext\\x0d\\x09");
        assert_eq!(escape_control("\u{7f}\u{9b}"), "\\x7f\\u{9b}");
        assert_eq!(escape_control("abc\u{202e}fed"), "abc\\u{202e}fed");
        // Idempotent: the CLI may escape a report whose fields are escaped already.
        assert_eq!(escape_control(&escape_control("a\u{1b}b")), "a\\x1bb");
        assert_eq!(escape_control("ü€"), "ü€");
    }
}
