use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;

/// Why credentials could not be looked up or stored. No variant ever holds a password, a secret or
/// the raw contents of a file that may contain one.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read Docker config {path}: {source}; fix its permissions or remove it")]
    DockerConfigRead { path: PathBuf, source: io::Error },

    #[error("Docker config {path} is not valid ({reason}); fix it or move it away")]
    DockerConfigInvalid { path: PathBuf, reason: String },

    #[error(
        "the \"auth\" field of auths[\"{key}\"] in Docker config {path} is not base64 of \"username:password\"; \
         run `docker login` for that registry again or remove the entry"
    )]
    DockerAuthInvalid { path: PathBuf, key: String },

    #[error(
        "credential helper `{program}` was not found in PATH; it is named by {origin} in Docker config {config}: \
         install it or remove that entry"
    )]
    HelperNotFound {
        program: String,
        origin: String,
        config: PathBuf,
    },

    #[error("cannot run credential helper {path}: {source}")]
    HelperSpawn { path: PathBuf, source: io::Error },

    #[error("credential helper `{program} get` failed ({status}): {output}")]
    HelperFailed {
        program: String,
        status: ExitStatus,
        output: String,
    },

    #[error(
        "credential helper `{program} get` did not print a JSON object with string fields \"Username\" and \
         \"Secret\" ({reason})"
    )]
    HelperResponseInvalid { program: String, reason: String },

    #[error("cannot read credential store {path}: {source}")]
    StoreRead { path: PathBuf, source: io::Error },

    #[error(
        "refusing to read credential store {path}: other users can access it (mode {mode:04o}); \
         run `chmod 600 {path}`, or `tart login` again to rewrite it privately, and consider changing the \
         passwords it holds"
    )]
    StoreNotPrivate { path: PathBuf, mode: u32 },

    #[error("credential store {path} is not valid ({reason}); fix it, or delete it and run `tart login` again")]
    StoreInvalid { path: PathBuf, reason: String },

    #[error("cannot write credential store {path}: {source}; check that its directory is writable")]
    StoreWrite { path: PathBuf, source: io::Error },
}
