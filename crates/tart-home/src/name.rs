use crate::{Error, Result};

/// Checks that `name` can be a directory under `vms/` without escaping it or surprising the
/// filesystem. Tart itself only rejects `/`; we also refuse names the kernel would refuse or
/// interpret (`.`/`..`, NUL, over 255 bytes).
pub fn validate_local_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        "the name is empty"
    } else if name.contains('/') {
        "a local name cannot contain \"/\""
    } else if name == "." || name == ".." {
        "\".\" and \"..\" are not VM names"
    } else if name.contains('\0') {
        "the name contains a NUL byte"
    } else if name.len() > 255 {
        "the name is longer than 255 bytes"
    } else {
        return Ok(());
    };
    Err(Error::InvalidName {
        name: name.to_owned(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::validate_local_name;

    #[test]
    fn accepts_ordinary_names() {
        for name in [
            "debian",
            "debian:latest",
            "my vm",
            "ünïcode",
            "a.b-c_d",
            &"x".repeat(255),
        ] {
            validate_local_name(name).unwrap();
        }
    }

    #[test]
    fn rejects_names_that_escape_or_break_the_directory() {
        for name in ["", "/", "a/b", ".", "..", "a\0b", &"x".repeat(256)] {
            let err = validate_local_name(name).unwrap_err().to_string();
            assert!(err.starts_with("invalid VM name"), "{err}");
        }
    }
}
