//! The command lines that Tart's integrations run (../shared/spec/integrations.md §1-§4:
//! gitlab-tart-executor, packer-plugin-tart, Orchard's worker, cirrus-cli), replayed verbatim
//! against our binary, and what they parse from its output. None of them can be built here (Go
//! 1.24 and a module proxy), so their argv is the contract: flags before and after the VM name,
//! `--flag=value` and `--flag value`, stdout as they read it, and for every failure the first
//! non-empty line of stderr (else stdout), which is all that each of them reports.
//!
//! Without a guest (fast): every sequence up to `run`, against a real registry where the
//! integration pulls. With the test guest under QEMU, in a network lab of its own: `tart run`
//! started detached and stopped by `tart stop`, by SIGINT and by SIGKILL, and Orchard's worker
//! driving our binary as `vetu`.
//!
//! `replay`: the sequences without a guest; `running`: with one.

use std::fs;
use std::process::{Command, Stdio};

use serde_json::Value;
use tart_testkit::Registry;

#[path = "../common/mod.rs"]
mod common;
mod replay;
mod running;

use common::Home;

/// What a Go consumer sees of one command: exit status, stdout, stderr.
struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Out {
    fn of(command: &mut Command) -> Out {
        let out = command.stdin(Stdio::null()).output().unwrap();
        Out {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// `firstNonEmptyLine(stderr, stdout)`: the error text of gitlab-tart-executor, Orchard and
    /// cirrus-cli.
    fn first_error_line(&self) -> &str {
        [&self.stderr, &self.stdout]
            .into_iter()
            .find_map(|text| text.lines().map(str::trim).find(|line| !line.is_empty()))
            .unwrap_or("")
    }
}

/// `args` succeeds; its stdout.
fn ok(command: &mut Command, args: &[&str]) -> String {
    let out = Out::of(command.args(args));
    assert_eq!(out.code, Some(0), "{args:?}: {}{}", out.stdout, out.stderr);
    out.stdout
}

/// `args` fails with exit status `code`, and the line the integration reports contains `needle`.
fn fails(command: &mut Command, args: &[&str], code: i32, needle: &str) -> String {
    let out = Out::of(command.args(args));
    assert_eq!(out.code, Some(code), "{args:?}: {}{}", out.stdout, out.stderr);
    let line = out.first_error_line().to_owned();
    assert!(line.contains(needle), "{args:?}: reported {line:?}, wanted {needle:?}");
    line
}

/// A `vetu` link to our binary, as an Orchard worker host would have on its PATH.
fn vetu(home: &Home) -> Command {
    let link = home.dir.path().join("bin/vetu");
    if !link.exists() {
        fs::create_dir_all(link.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(assert_cmd::cargo::cargo_bin("tart"), &link).unwrap();
    }
    home.command(link)
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|err| panic!("not JSON ({err}): {text}"))
}

fn vm_config(home: &Home, vm: &str) -> Value {
    json(&fs::read_to_string(home.dir.path().join(format!("home/vms/{vm}/config.json"))).unwrap())
}

fn disk_len(home: &Home, vm: &str) -> u64 {
    fs::metadata(home.dir.path().join(format!("home/vms/{vm}/disk.img")))
        .unwrap()
        .len()
}

/// `list --format json` as Orchard (`[]{Name,Source,State,Running}`, Go decodes keys without
/// regard to case) and the PyPI driver (`Size` an integer) decode it; the entry named `vm`.
fn listed(stdout: &str, vm: &str) -> Option<Value> {
    let entries = json(stdout);
    for entry in entries.as_array().expect("an array") {
        assert!(entry["Name"].is_string() && entry["Source"].is_string(), "{entry}");
        assert!(entry["State"].is_string() && entry["Running"].is_boolean(), "{entry}");
        assert!(entry["Size"].is_u64() && entry["Disk"].is_u64(), "{entry}");
    }
    entries.as_array().unwrap().iter().find(|e| e["Name"] == vm).cloned()
}

/// A 1 GB Linux VM pushed to `registry` as `<host>/ci/base:latest`; its remote name.
fn push_base_image(home: &Home, registry: &Registry) -> String {
    let image = format!("{}/ci/base:latest", registry.host());
    ok(&mut home.tart(), &["create", "--linux", "--disk-size", "1", "base"]);
    let mut push = home.tart();
    if let Some((user, password)) = registry.credentials() {
        push.env("TART_REGISTRY_USERNAME", user)
            .env("TART_REGISTRY_PASSWORD", password);
    }
    ok(&mut push, &["push", "--insecure", "base", &image]);
    image
}
