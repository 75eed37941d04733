//! What a kernel or driver version string may contain. Both become path components (the
//! builder walks `lib/modules/<kernel_version>`), so they are restricted to the characters real
//! versions use: `kernel_version = "/"` would otherwise make the builder walk the host's `/`.

/// Why a version string is refused; `None` when it is acceptable.
pub fn version_string_problem(value: &str) -> Option<String> {
    if value.is_empty() {
        return Some("is empty".into());
    }
    if value == "." || value == ".." {
        return Some(format!("`{value}` is not a version"));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '~' | '-')))
    {
        return Some(format!(
            "`{value}` contains {bad:?}; only letters, digits and . _ + ~ - are allowed"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::version_string_problem;

    #[test]
    fn real_versions_pass_and_paths_do_not() {
        for ok in ["6.1.0-56-amd64", "535.261.03", "6.8.0-1+deb~1", "5.15_rc1"] {
            assert_eq!(version_string_problem(ok), None, "{ok}");
        }
        for bad in ["/", ".", "..", "", "6.1/../..", "a b", "6.1\n", "x\0"] {
            assert!(version_string_problem(bad).is_some(), "{bad:?}");
        }
    }
}
