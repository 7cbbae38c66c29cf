//! The integrations' command lines up to `tart run`, and `run`'s flags, without a guest.

use std::fs;
use std::io::Read;
use std::time::{Duration, Instant};

use tart_testkit::Registry;

use super::common::Home;
use super::{disk_len, fails, json, listed, ok, push_base_image, vetu, vm_config, Out};

/// gitlab-tart-executor's `prepare` up to `run` and its `cleanup` (§1), with the registry
/// credentials it derives from `CUSTOM_ENV_CI_REGISTRY*`.
#[test]
fn gitlab_executor_prepare_and_cleanup() {
    let registry = Registry::basic("gitlab-ci-token", "job-token");
    let home = Home::empty();
    let image = push_base_image(&home, &registry);
    let executor = || {
        let mut tart = home.tart();
        tart.env("TART_REGISTRY_HOSTNAME", registry.host())
            .env("TART_REGISTRY_USERNAME", "gitlab-ci-token")
            .env("TART_REGISTRY_PASSWORD", "job-token");
        tart
    };
    ok(&mut executor(), &["pull", &image, "--insecure", "--concurrency", "2"]);
    ok(
        &mut executor(),
        &["clone", &image, "gitlab-4242", "--insecure", "--concurrency=2"],
    );
    ok(&mut executor(), &["set", "--cpu", "2", "gitlab-4242"]);
    ok(&mut executor(), &["set", "--memory", "2048", "gitlab-4242"]);
    ok(&mut executor(), &["set", "--random-mac", "gitlab-4242"]);
    ok(&mut executor(), &["set", "--display", "1024x768", "gitlab-4242"]);
    let config = vm_config(&home, "gitlab-4242");
    assert_eq!(config["cpuCount"], 2);
    assert_eq!(config["memorySize"], 2048u64 << 20);
    assert_ne!(config["macAddress"], vm_config(&home, "base")["macAddress"]);

    // Only "os" is read, to choose `sudo mount -t virtiofs` for the shares.
    let info = json(&ok(&mut executor(), &["get", "--format", "json", "gitlab-4242"]));
    assert_eq!(info["OS"], "linux");
    assert_eq!(info["CPU"], 2);
    assert_eq!(info["Memory"], 2048);
    assert_eq!(info["Display"], "1024x768");

    // The IP loop before the VM runs, and cleanup after a prepare that never started it: stop's
    // failure is only logged, delete must succeed.
    let started = Instant::now();
    fails(
        &mut executor(),
        &["ip", "--wait", "2", "--resolver", "dhcp", "gitlab-4242"],
        1,
        "no IP address found, is your VM running?",
    );
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "--wait 2 waited {:?}",
        started.elapsed()
    );
    fails(
        &mut executor(),
        &["stop", "gitlab-4242"],
        2,
        "VM \"gitlab-4242\" is not running",
    );
    ok(&mut executor(), &["delete", "gitlab-4242"]);
    assert!(listed(&ok(&mut home.tart(), &["list", "--format", "json"]), "gitlab-4242").is_none());

    // Bad input, each with the line the job log shows.
    let mut wrong = home.tart();
    wrong
        .env("TART_REGISTRY_USERNAME", "gitlab-ci-token")
        .env("TART_REGISTRY_PASSWORD", "expired");
    let line = fails(&mut wrong, &["pull", &image, "--insecure"], 1, registry.host());
    assert!(line.contains("401") || line.contains("credentials"), "{line}");
    let missing = format!("{}/ci/missing:latest", registry.host());
    let line = fails(
        &mut executor(),
        &["clone", &missing, "gitlab-7", "--insecure"],
        1,
        "ci/missing",
    );
    assert!(
        line.contains("not found") || line.contains("404") || line.contains("unknown"),
        "{line}"
    );
    // One attempt: the line is the same as after tart's five, without their back-off.
    let line = fails(
        executor().env("TART_RETRY_STALLS", "1"),
        &["pull", "127.0.0.1:9/ci/base:latest", "--insecure"],
        1,
        "is 127.0.0.1:9 reachable?",
    );
    assert!(line.contains("Connection refused"), "{line}");
    fails(
        &mut executor(),
        &["set", "--cpu", "2", "gitlab-7"],
        2,
        "the specified VM \"gitlab-7\" does not exist",
    );
    fails(
        &mut executor(),
        &["delete", "gitlab-7"],
        2,
        "the specified VM \"gitlab-7\" does not exist",
    );
    assert!(!home.dir.path().join("home/vms/gitlab-7").exists());
}

/// Every `tart run` command line of §1-§4 is taken, flags before or after the name: against a VM
/// that runs already each ends with tart's "already running", which comes after the flags and
/// the `--dir` and `--root-disk-opts` values are checked (a flag we lacked would end it with a
/// usage error first).
#[test]
fn every_integrations_run_command_line_is_accepted() {
    let home = Home::empty();
    ok(&mut home.tart(), &["create", "--linux", "--disk-size", "1", "busy"]);
    // The lock `tart run` holds, taken by this process: `busy` runs as far as tart can tell.
    let config = home.dir.path().join("home/vms/busy/config.json");
    let _running = tart_home::PidLock::try_acquire(&config).unwrap().unwrap();
    let builds = home.dir.path().join("builds");
    fs::create_dir_all(&builds).unwrap();
    let builds_share = format!("{}:tag=tart.virtiofs.buildsdir.4242", builds.display());
    let named_ro = format!("project:{}:ro", builds.display());
    let tagged_ro = format!("working-dir:{}:tag=tart.virtiofs.working-dir,ro", builds.display());
    let runs: Vec<Vec<&str>> = vec![
        // gitlab-tart-executor
        vec![
            "--net-softnet",
            "--net-softnet-allow",
            "10.0.0.0/8",
            "--root-disk-opts",
            "sync=none",
        ],
        vec![
            "--net-bridged",
            "eth0",
            "--no-graphics",
            "--nested",
            "--dir",
            &builds_share,
        ],
        // packer-plugin-tart: name first, then flags
        vec!["--no-graphics"],
        vec!["--graphics", "--vnc-experimental", "--disk=/tmp/cidata.iso:ro"],
        // Orchard (tart runtime)
        vec![
            "--net-softnet-allow",
            "10.0.0.0/8,192.168.0.0/16",
            "--net-softnet-block",
            "10.1.0.0/16",
        ],
        vec!["--net-bridged=eth0", "--no-graphics", "--nested", "--suspendable"],
        vec!["--dir=project:/tmp:ro", "--no-graphics"],
        // cirrus-cli and tartelet
        vec![
            "--no-graphics",
            "--no-clipboard",
            "--no-audio",
            "--root-disk-opts",
            "sync=none",
        ],
        vec!["--no-graphics", "--dir", &named_ro, "--dir", &tagged_ro],
        vec!["--dir=runner:/tmp"],
        // gitlab-runner-tart-driver (PyPI)
        vec!["--no-graphics", "--net-softnet", "--vnc"],
    ];
    for flags in &runs {
        let mut before = vec!["run"];
        before.extend(flags);
        before.push("busy");
        fails(&mut home.tart(), &before, 2, "VM \"busy\" is already running!");
        let mut after = vec!["run", "busy"];
        after.extend(flags);
        fails(&mut home.tart(), &after, 2, "VM \"busy\" is already running!");
    }
    let long_name = "orchard-ci-1-3f2c6f1e-2a6b-4c1d-9d5e-0123456789ab-0";
    fails(
        &mut home.tart(),
        &["run", "--no-graphics", long_name],
        2,
        "does not exist",
    );
    // Packer passes these when a template asks; each refusal says why.
    ok(&mut home.tart(), &["create", "--linux", "--disk-size", "1", "pkr"]);
    fails(
        &mut home.tart(),
        &["run", "pkr", "--no-graphics", "--recovery"],
        1,
        "macOS guests need a macOS host",
    );
    fails(
        &mut home.tart(),
        &["run", "pkr", "--rosetta=rosetta"],
        1,
        "only on Apple silicon Macs",
    );
    fails(
        &mut home.tart(),
        &["run", "pkr", "--vnc", "--vnc-experimental"],
        64,
        "mutually exclusive",
    );
    fails(
        &mut home.tart(),
        &["run", "pkr", "--net-softnet", "--net-bridged=eth0"],
        64,
        "--net-bridged, --net-softnet and --net-host are mutually exclusive",
    );
    assert_eq!(
        json(&ok(&mut home.tart(), &["get", "pkr", "--format", "json"]))["State"],
        "stopped"
    );
}

/// packer-plugin-tart up to `run` (§2): it opens `vms/<name>/disk.img` itself as a raw disk.
#[test]
fn packer_plugin_create_set_and_delete() {
    let home = Home::empty();
    fails(
        &mut home.tart(),
        &["create", "--from-ipsw", "latest", "--disk-size", "40", "macos"],
        1,
        "macOS guests need a macOS host",
    );
    fails(
        &mut home.tart(),
        &["create", "--linux", "--disk-size", "8", "--disk-format", "asif", "asif"],
        1,
        "ASIF",
    );
    ok(
        &mut home.tart(),
        &["create", "--linux", "--disk-size", "2", "packer-ubuntu"],
    );
    ok(
        &mut home.tart(),
        &[
            "set",
            "packer-ubuntu",
            "--cpu",
            "4",
            "--memory",
            "8192",
            "--display",
            "1280x800",
        ],
    );
    ok(&mut home.tart(), &["set", "--disk-size", "3", "packer-ubuntu"]);
    assert_eq!(disk_len(&home, "packer-ubuntu"), 3_000_000_000);
    let mut mbr = [0u8; 512];
    fs::File::open(home.dir.path().join("home/vms/packer-ubuntu/disk.img"))
        .unwrap()
        .read_exact(&mut mbr)
        .unwrap();
    assert!(mbr.iter().all(|&b| b == 0), "an empty raw disk, no image-format header");
    let info = json(&ok(&mut home.tart(), &["get", "--format", "json", "packer-ubuntu"]));
    assert_eq!((info["CPU"].as_u64(), info["Memory"].as_u64()), (Some(4), Some(8192)));
    assert_eq!(info["Disk"], 3);
    fails(
        &mut home.tart(),
        &["set", "--disk-size", "2", "packer-ubuntu"],
        1,
        "should be larger than the current disk size",
    );
    // The IP probes Packer runs before the VM is up: failures, and nothing but the error.
    for probe in [
        vec!["ip", "--wait", "1", "packer-ubuntu"],
        vec!["ip", "--wait", "1", "--resolver", "agent", "packer-ubuntu"],
        vec!["ip", "--wait", "1", "--resolver", "arp", "packer-ubuntu"],
    ] {
        let out = Out::of(home.tart().args(&probe));
        assert_eq!(out.code, Some(1));
        assert!(out.stdout.is_empty(), "{probe:?} printed {:?}", out.stdout);
        assert!(
            out.stderr.starts_with("no IP address found, is your VM running?"),
            "{}",
            out.stderr
        );
    }
    ok(&mut home.tart(), &["delete", "packer-ubuntu"]);
    assert!(!home.dir.path().join("home/vms/packer-ubuntu").exists());
}

/// cirrus-cli's tart isolation up to `run` (§4): names before flags, `TART_NO_AUTO_PRUNE`
/// present but empty, `list --quiet` at worker start and `list --format=json` for breadcrumbs.
#[test]
fn cirrus_cli_clone_set_list_and_delete() {
    let home = Home::empty();
    ok(
        &mut home.tart(),
        &["create", "--linux", "--disk-size", "1", "macos-image"],
    );
    let vm = "cirrus-cli-7-3f2c6f1e-2a6b-4c1d-9d5e-0123456789ab";
    ok(home.tart().env("TART_NO_AUTO_PRUNE", ""), &["clone", "macos-image", vm]);
    ok(&mut home.tart(), &["set", vm, "--random-mac"]);
    ok(&mut home.tart(), &["set", vm, "--cpu", "4"]);
    ok(&mut home.tart(), &["set", vm, "--memory", "4096"]);
    ok(&mut home.tart(), &["set", vm, "--disk-size", "2"]);
    ok(&mut home.tart(), &["set", vm, "--display", "1920x1080"]);
    let config = vm_config(&home, vm);
    assert_eq!(
        (config["cpuCount"].as_u64(), config["memorySize"].as_u64()),
        (Some(4), Some(4096 << 20))
    );
    assert_eq!(disk_len(&home, vm), 2_000_000_000);
    // The agent OS comes from `os`.
    assert_eq!(
        json(&ok(&mut home.tart(), &["get", "--format", "json", vm]))["OS"],
        "linux"
    );

    let names = ok(&mut home.tart(), &["list", "--quiet"]);
    assert_eq!(names.lines().collect::<Vec<_>>(), [vm, "macos-image"]);
    let names = ok(&mut home.tart(), &["list", "-q", "--source", "local"]);
    assert_eq!(names.lines().count(), 2);
    let entry = listed(&ok(&mut home.tart(), &["list", "--format=json"]), vm).unwrap();
    assert_eq!(
        (entry["Source"].as_str(), entry["Running"].as_bool()),
        (Some("local"), Some(false))
    );
    fails(&mut home.tart(), &["ip", "--wait", "1", vm], 1, "no IP address found");
    fails(&mut home.tart(), &["stop", "--timeout", "5", vm], 2, "is not running");
    ok(&mut home.tart(), &["delete", vm]);
    // The PyPI driver asks for the version and reads `get` as a table.
    assert!(ok(&mut home.tart(), &["--version"]).starts_with("tart "));
    let table = ok(&mut home.tart(), &["get", "macos-image"]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    for column in ["OS", "CPU", "Memory", "Disk", "Size", "Display", "State"] {
        assert!(header.contains(&column), "{column} missing from {header:?}");
    }
}

/// Orchard's worker with the tart runtime (§3): long on-disk names, `fqn` of the image,
/// `set` with the name last, `--random-serial` (macOS identity: nothing for a Linux VM).
#[test]
fn orchard_tart_runtime_clone_fqn_set_list() {
    let registry = Registry::anonymous();
    let home = Home::empty();
    let image = push_base_image(&home, &registry);
    let odn = "orchard-ci-1-3f2c6f1e-2a6b-4c1d-9d5e-0123456789ab-0";
    ok(&mut home.tart(), &["pull", &image, "--insecure"]);
    ok(&mut home.tart(), &["clone", &image, odn, "--insecure"]);
    let fqn = ok(&mut home.tart(), &["fqn", &image]);
    let fqn = fqn.trim();
    assert!(
        fqn.starts_with(&format!("{}/ci/base@sha256:", registry.host())) && fqn.len() > 64,
        "{fqn}"
    );
    assert_eq!(ok(&mut home.tart(), &["fqn", odn]).trim(), odn);
    for (flag, value) in [("--memory", "3072"), ("--cpu", "3"), ("--disk-size", "2")] {
        ok(&mut home.tart(), &["set", flag, value, odn]);
    }
    let mac = vm_config(&home, odn)["macAddress"].clone();
    ok(&mut home.tart(), &["set", "--random-mac", odn]);
    ok(&mut home.tart(), &["set", "--random-serial", odn]);
    let config = vm_config(&home, odn);
    assert_ne!(config["macAddress"], mac);
    assert_eq!(
        (config["cpuCount"].as_u64(), config["memorySize"].as_u64()),
        (Some(3), Some(3072 << 20))
    );
    // syncOnDiskVMs: local `orchard-` entries, and the cached image.
    let list = ok(&mut home.tart(), &["list", "--format", "json"]);
    let entry = listed(&list, odn).unwrap();
    assert_eq!(
        (entry["State"].as_str(), entry["Running"].as_bool()),
        (Some("stopped"), Some(false))
    );
    assert_eq!(listed(&list, &image).unwrap()["Source"], "OCI");
    fails(&mut home.tart(), &["suspend", odn], 2, "is not running");
    fails(&mut home.tart(), &["stop", odn], 2, "is not running");
    ok(&mut home.tart(), &["delete", odn]);
}

/// The same worker on Linux runs `vetu` (§3, and cirrus-cli's vetu isolation, §4): through a
/// `vetu` link every command line works with vetu's flags and units, and fails as vetu does
/// (status 1, one line).
#[test]
fn vetu_mode_takes_orchards_and_cirrus_clis_command_lines() {
    let registry = Registry::anonymous();
    let home = Home::empty();
    let image = push_base_image(&home, &registry);
    let odn = "orchard-ci-2-0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d-0";
    assert!(ok(&mut vetu(&home), &["--version"]).starts_with("vetu "));
    ok(&mut vetu(&home), &["pull", &image, "--insecure"]);
    ok(
        &mut vetu(&home),
        &["clone", &image, odn, "--insecure", "--concurrency", "2"],
    );
    let fqn = ok(&mut vetu(&home), &["fqn", &image]);
    assert!(
        fqn.trim().starts_with(&format!("{}/ci/base@sha256:", registry.host())),
        "{fqn}"
    );
    ok(&mut vetu(&home), &["set", "--memory", "1536", odn]);
    ok(&mut vetu(&home), &["set", "--cpu", "3", odn]);
    ok(&mut vetu(&home), &["set", "--disk-size", "2", odn]);
    let config = vm_config(&home, odn);
    assert_eq!(config["memorySize"], 1536u64 << 20, "MiB, as vetu");
    assert_eq!(config["cpuCount"], 3, "one flag changes one setting");
    assert_eq!(disk_len(&home, odn), 2_000_000_000, "GB of 10^9 bytes, as vetu");
    // cirrus-cli: the name first.
    ok(&mut vetu(&home), &["set", odn, "--cpu", "2"]);
    assert_eq!(vm_config(&home, odn)["cpuCount"], 2);

    let entry = listed(&ok(&mut vetu(&home), &["list", "--format", "json"]), odn).unwrap();
    assert_eq!(
        (entry["Source"].as_str(), entry["Running"].as_bool()),
        (Some("local"), Some(false))
    );
    assert!(ok(&mut vetu(&home), &["list", "--quiet"])
        .lines()
        .any(|name| name == odn));

    // Failures: status 1 whatever tart's own status would be, and tart's one-line reason.
    fails(
        &mut vetu(&home),
        &["ip", "--wait", "1", odn],
        1,
        "no IP address found, is your VM running?",
    );
    fails(
        &mut vetu(&home),
        &["stop", "--timeout", "5", odn],
        1,
        &format!("VM \"{odn}\" is not running"),
    );
    fails(
        &mut vetu(&home),
        &["run", "orchard-gone-0"],
        1,
        "the specified VM \"orchard-gone-0\" does not exist",
    );
    fails(
        &mut vetu(&home),
        &["set", "--memory", "1024", "missing"],
        1,
        "does not exist",
    );
    fails(
        &mut vetu(&home),
        &["run", "--no-graphics", odn],
        1,
        "unexpected argument '--no-graphics'",
    );
    fails(
        &mut vetu(&home),
        &["set", "--memory", "2GB", odn],
        1,
        "invalid value '2GB' for '--memory",
    );
    fails(
        &mut vetu(&home),
        &["create", "--kernel", "vmlinuz", "vm"],
        1,
        "unrecognized subcommand 'create'",
    );
    fails(&mut vetu(&home), &["list", "--source", "cloud"], 1, "cloud");
    fails(
        &mut vetu(&home),
        &["run", "--net-host", "--net-bridged", "eth0", odn],
        1,
        "cannot be used with",
    );
    // An option tart cannot honour is noted on stdout, and the rest goes on.
    let out = Out::of(vetu(&home).args(["run", "--net-host-mtu", "1400", "orchard-gone-0"]));
    assert_eq!(out.code, Some(1));
    assert!(
        out.stdout.starts_with("--net-host-mtu 1400 is ignored"),
        "{}",
        out.stdout
    );
    assert!(out.first_error_line().contains("does not exist"), "{}", out.stderr);

    ok(&mut vetu(&home), &["delete", odn]);
    assert!(listed(&ok(&mut vetu(&home), &["list", "--format", "json"]), odn).is_none());
    fails(&mut vetu(&home), &["delete", odn], 1, "does not exist");

    // VETU_HOME names the storage when TART_HOME is not set.
    let elsewhere = home.dir.path().join("vetu-home");
    let mut with_vetu_home = vetu(&home);
    with_vetu_home.env_remove("TART_HOME").env("VETU_HOME", &elsewhere);
    ok(&mut with_vetu_home, &["clone", &image, "in-vetu-home", "--insecure"]);
    assert!(elsewhere.join("vms/in-vetu-home/config.json").is_file());
}
