//! Releases defined twice, found in the registry's text before the TOML parser sees it.

use std::collections::HashMap;

use super::RegistryError;

/// A TOML parser rejects a table defined twice with a generic message; find it first so the
/// error can name the release and both lines.
pub(super) fn check_duplicate_headers(text: &str, file: &str) -> Result<(), RegistryError> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.starts_with("[[") || !line.starts_with('[') {
            continue;
        }
        let Some(end) = line.find(']') else { continue };
        let header = line[1..end].trim();
        let Some(rest) = header.strip_prefix("releases") else {
            continue;
        };
        let Some(rest) = rest.trim_start().strip_prefix('.') else {
            continue;
        };
        let name = unquote(rest.trim());
        let Some(name) = name else { continue };
        if let Some(first_line) = seen.insert(name.clone(), i + 1) {
            return Err(RegistryError::DuplicateRelease {
                file: file.to_string(),
                release: name,
                first_line,
                second_line: i + 1,
            });
        }
    }
    Ok(())
}

/// The release name of a header's remainder, if it is a single key (quoted or bare).
fn unquote(key: &str) -> Option<String> {
    for q in ['"', '\''] {
        if let Some(inner) = key.strip_prefix(q) {
            let inner = inner.strip_suffix(q)?;
            return (!inner.contains(q)).then(|| inner.to_string());
        }
    }
    key.chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        .then(|| key.to_string())
}
