//! Pulls that survive a flaky registry, results that survive a power loss, memory that stays
//! bounded: retries that follow progress (behind a proxy that cuts blob downloads), the order of
//! fsync and rename when a pull or a clone moves its result into place (read from `strace` of
//! the real binary), and the peak RSS of push and pull of a disk that does not compress.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tart_testkit::{measured, FaultProxy, Registry};

mod oci_common;
use oci_common::*;

#[test]
fn pulls_succeed_while_half_the_blob_downloads_are_cut() {
    let registry = Registry::anonymous();
    let proxy = FaultProxy::start(registry.host());
    let host = proxy.host();
    let image = store_v2_image(
        &registry,
        "org/vm",
        "v1",
        &[data_chunk(200), data_chunk(201), data_chunk(202)],
    );
    let name = format!("{host}/org/vm:v1");
    proxy.cut_blobs_randomly(0.5, 2026);

    let started = Instant::now();
    for attempt in 1..=25 {
        let home = Home::new();
        let earlier = proxy.requests().len();
        let out = home.run_with(&["pull", "--insecure", &name], &[], None);
        assert!(
            out.status.success(),
            "pull {attempt} failed ({} downloads cut so far):\n{}\nits requests:\n{}",
            proxy.random_cuts(),
            out.stderr,
            describe(&proxy.requests()[earlier..])
        );
        assert_pulled(&home, host, "org/vm", &image);
    }
    let downloads = proxy.requests().iter().filter(|r| r.blob_get().is_some()).count();
    let cuts = proxy.random_cuts();
    eprintln!(
        "25 pulls: {downloads} blob downloads, {cuts} cut, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        cuts >= 100 && cuts as f64 >= 0.35 * downloads as f64,
        "only {cuts} of {downloads} downloads were cut"
    );
}

/// docker-registry forgets an upload session whose PATCH or PUT broke off (a status request on
/// it answers 404), so there is no offset to resume from: the blob is uploaded again from a new
/// session, and only that blob.
#[test]
fn pushes_succeed_while_half_the_uploads_are_cut_each_blob_restarted_alone() {
    let registry = Registry::anonymous();
    let proxy = FaultProxy::start(registry.host());
    let host = proxy.host();
    let home = Home::new();
    make_two_chunk_vm(&home, "vm", 500);
    proxy.cut_uploads_randomly(0.5, 2027);

    let started = Instant::now();
    for attempt in 1..=2 {
        let earlier = proxy.requests().len();
        let name = format!("{host}/org/up{attempt}:v1");
        // Every cut costs the whole blob, so an attempt never brings lasting progress: allow more
        // than the default five in a row, so that chance alone cannot end the push.
        let out = home.run_with(
            &["push", "--insecure", "vm", &name],
            &[("TART_RETRY_STALLS", "14")],
            None,
        );
        let requests = proxy.requests()[earlier..].to_vec();
        assert!(
            out.status.success(),
            "push {attempt} failed ({} uploads cut so far):\n{}\nits requests:\n{}",
            proxy.upload_cuts(),
            out.stderr,
            describe(&requests)
        );
        // Each blob was committed exactly once: a cut restarted that blob, not the others.
        let mut committed = std::collections::BTreeMap::<String, usize>::new();
        for request in requests.iter().filter(|r| r.method == "PUT" && r.status == 201) {
            if let Some((_, digest)) = query_pairs(request).into_iter().find(|(k, _)| k == "digest") {
                *committed.entry(digest).or_default() += 1;
            }
        }
        let (_, manifest) = manifest_of(&registry, &format!("org/up{attempt}"), "v1");
        let mut blobs: Vec<String> = manifest["layers"]
            .as_array()
            .unwrap()
            .iter()
            .chain([&manifest["config"]])
            .map(|layer| layer["digest"].as_str().unwrap().to_owned())
            .collect();
        blobs.sort();
        blobs.dedup();
        assert_eq!(
            committed.keys().cloned().collect::<Vec<_>>(),
            blobs,
            "{}",
            describe(&requests)
        );
        assert!(committed.values().all(|&n| n == 1), "{committed:?}");

        let other = Home::new();
        other.ok(&["pull", "--insecure", &format!("{}/org/up{attempt}:v1", registry.host())]);
        let digest = tart_testkit::sha256_digest(&registry.manifest(&format!("org/up{attempt}"), "v1").0);
        assert_same_file(
            &other
                .image_dir(registry.host(), &format!("org/up{attempt}"), &digest)
                .join("disk.img"),
            &home.disk("vm"),
        );
    }
    let uploads = proxy
        .requests()
        .iter()
        .filter(|r| r.method == "PUT" && r.path.contains("/blobs/uploads/"))
        .count();
    eprintln!(
        "2 pushes: {uploads} uploads, {} cut, {:.1} s",
        proxy.upload_cuts(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        proxy.upload_cuts() as f64 >= 0.3 * uploads as f64,
        "only {} of {uploads} uploads were cut",
        proxy.upload_cuts()
    );
}

#[test]
fn retries_go_on_while_data_arrives_and_give_up_when_it_stops() {
    let registry = Registry::anonymous();
    let proxy = FaultProxy::start(registry.host());
    let host = proxy.host();
    let image = store_two_layer_image(&registry, "org/vm", 210);
    let name = format!("{host}/org/vm:v1");
    let cut = &image.layers[1];

    // Ten cuts in a row, each after 300 kB of the (resumed) download: every attempt brings data,
    // so the pull goes on, however many attempts it takes.
    proxy.truncate_blob_after(cut, 300_000, 10);
    let home = Home::new();
    home.ok(&["pull", "--insecure", &name]);
    assert_pulled(&home, host, "org/vm", &image);
    assert_eq!(proxy.blob_gets(cut).len(), 11, "{}", describe(&proxy.blob_gets(cut)));

    // Attempts that bring nothing: TART_RETRY_STALLS of them in a row end the pull, in one line.
    proxy.clear_requests();
    proxy.truncate_blob_after(cut, 0, 1000);
    let home = Home::new();
    let out = home.fail_with(&["pull", "--insecure", &name], &[("TART_RETRY_STALLS", "2")]);
    let last = out.stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains("gave up after 2 attempts in a row") && last.contains("TART_RETRY_STALLS") && last.contains(cut),
        "{}",
        out.stderr
    );
    assert_eq!(proxy.blob_gets(cut).len(), 2, "{}", describe(&proxy.blob_gets(cut)));
    assert!(home.cache_entries().is_empty());

    // Or the deadline, whichever comes first.
    let started = Instant::now();
    let out = home.fail_with(
        &["pull", "--insecure", &name],
        &[("TART_RETRY_STALLS", "1000"), ("TART_RETRY_DEADLINE", "2")],
    );
    let last = out.stderr.lines().last().unwrap_or_default();
    assert!(last.contains("TART_RETRY_DEADLINE=2"), "{}", out.stderr);
    assert!(started.elapsed() < Duration::from_secs(60));

    let out = home.fail_with(&["pull", "--insecure", &name], &[("TART_RETRY_STALLS", "lots")]);
    assert!(out.stderr.contains("TART_RETRY_STALLS"), "{}", out.stderr);
}

#[test]
fn pulls_killed_at_random_moments_never_fetch_a_journaled_chunk_again() {
    let registry = Registry::anonymous();
    let proxy = FaultProxy::start(registry.host());
    let host = proxy.host();
    let chunks: Vec<Vec<u8>> = (0..8).map(|i| data_chunk(230 + i)).collect();
    let image = store_v2_image(&registry, "org/vm", "v1", &chunks);
    let name = format!("{host}/org/vm:v1");
    // Slow enough that kills land while chunks are being written.
    for layer in &image.layers {
        proxy.delay_blob(layer, Duration::from_millis(500));
    }
    let home = Home::new();
    let journal = home.pull_staging(&image.digest).join("disk-layers.done");
    let journaled = || -> Vec<usize> {
        std::fs::read_to_string(&journal)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    };
    let mut moment = 0x2545_F491_4F6C_DD1Du64;
    let mut partial = 0;
    for _ in 0..10 {
        let done = journaled();
        if (1..chunks.len()).contains(&done.len()) {
            partial += 1;
        }
        let fetched: Vec<usize> = done.iter().map(|&i| proxy.blob_gets(&image.layers[i]).len()).collect();
        let pull = home.spawn(&["pull", "--insecure", &name]);
        moment = moment
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_millis(100 + (moment >> 33) % 900));
        pull.kill();
        for (&index, &before) in done.iter().zip(&fetched) {
            assert_eq!(
                proxy.blob_gets(&image.layers[index]).len(),
                before,
                "chunk {index} was journaled, yet fetched again"
            );
        }
    }
    assert!(
        partial >= 2,
        "only {partial} kills found a partly journaled pull to resume"
    );
    home.ok(&["pull", "--insecure", &name]);
    assert_pulled(&home, host, "org/vm", &image);
    let fetched: usize = image.layers.iter().map(|l| proxy.blob_gets(l).len()).sum();
    eprintln!("8 chunks, 10 kills ({partial} resumed a partial journal): {fetched} chunk downloads");
}

// ---------------------------------------------------------------------------------------------
// fsync before rename
// ---------------------------------------------------------------------------------------------

/// `tart <args>` under `strace -f`: its opens, directory creations, syncs and renames, each file
/// descriptor shown with its path (`-y`), in the order they happened.
fn traced(home: &Home, args: &[&str]) -> Vec<String> {
    let log = home.dir.path().join("strace.log");
    let tart = home.tart();
    let mut command = Command::new("strace");
    command
        .args(["-f", "-qq", "-y", "-s", "4096", "-o"])
        .arg(&log)
        .args([
            "-e",
            "trace=openat,mkdir,mkdirat,fsync,fdatasync,rename,renameat,renameat2",
        ])
        .arg(tart.get_program())
        .args(args);
    for (key, value) in tart.get_envs() {
        match value {
            Some(value) => command.env(key, value),
            None => command.env_remove(key),
        };
    }
    let out = command.output().expect("running strace (scripts/setup installs it)");
    assert!(
        out.status.success(),
        "strace tart {}: {}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Every path under `dir`, files and directories, relative to it.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let relative = PathBuf::from(path.file_name().unwrap());
        if path.is_dir() {
            found.extend(tree(&path).into_iter().map(|p| relative.join(p)));
        }
        found.push(relative);
    }
    found
}

/// `target` was published by renaming a staging directory onto it, and before that rename every
/// file and directory staged there (and the staging directory itself) was fsynced or
/// fdatasynced; after it, the directory that received `target` was fsynced.
fn assert_published_durably(trace: &[String], target: &Path) {
    let target_text = target.to_str().unwrap();
    let (at, staging) = trace
        .iter()
        .enumerate()
        .find_map(|(index, line)| {
            let call = line.split_once(" rename")?.1;
            let quoted: Vec<&str> = call.split('"').skip(1).step_by(2).collect();
            (quoted.len() >= 2 && quoted[1] == target_text).then(|| (index, quoted[0].to_owned()))
        })
        .unwrap_or_else(|| panic!("no rename onto {target_text}:\n{}", trace.join("\n")));
    let synced = |lines: &[String], path: &str| {
        let fd = format!("<{path}>");
        lines
            .iter()
            .any(|l| (l.contains(" fsync(") || l.contains(" fdatasync(")) && l.contains(&fd))
    };
    let before = &trace[..at];
    let mut staged = Vec::new();
    for relative in tree(target) {
        let path = format!("{staging}/{}", relative.display());
        if !before.iter().any(|l| l.contains(&format!("\"{path}\""))) {
            continue; // made after the rename (e.g. an access marker): not what the rename publishes
        }
        assert!(
            synced(before, &path),
            "{path} was not synced before the rename to {target_text}"
        );
        staged.push(relative);
    }
    for required in ["config.json", "disk.img", "nvram.bin"] {
        assert!(
            staged.contains(&PathBuf::from(required)),
            "{required} was not staged in {staging}: {staged:?}"
        );
    }
    assert!(
        synced(before, &staging),
        "the staging directory {staging} was not synced before the rename"
    );
    let parent = target.parent().unwrap().to_str().unwrap();
    assert!(
        synced(&trace[at + 1..], parent),
        "{parent} was not synced after the rename into it"
    );
}

#[test]
fn pull_and_clone_sync_their_files_before_the_rename_and_the_directory_after() {
    let registry = Registry::anonymous();
    let host = registry.host();
    let image = store_two_layer_image(&registry, "org/vm", 220);
    let name = format!("{host}/org/vm:v1");
    let home = Home::new();

    let trace = traced(&home, &["pull", "--insecure", &name]);
    let cached = home.image_dir(host, "org/vm", &image.digest);
    assert_published_durably(&trace, &cached);
    assert_pulled(&home, host, "org/vm", &image);

    let trace = traced(&home, &["clone", "--insecure", &name, "work"]);
    assert_published_durably(&trace, &home.vm("work"));
    assert_file_is(&home.disk("work"), &image.disk);
}

// ---------------------------------------------------------------------------------------------
// memory
// ---------------------------------------------------------------------------------------------

/// Peak RSS allowed to push or pull the disk below. Holding one compressed chunk of it in memory
/// (what push did before it spilled chunks to `tmp/`) takes more than this on its own.
const MEMORY_BOUND: u64 = 300 << 20;

#[test]
fn push_and_pull_of_an_incompressible_disk_stay_within_a_memory_bound() {
    let registry = Registry::anonymous();
    let host = registry.host();
    let home = Home::new();
    home.ok(&["create", "--linux", "--disk-size", "1", "vm"]);
    // Two chunks, random all through: the first a whole 512 MiB chunk.
    let len = CHUNK + 64 * MIB;
    let disk = OpenOptions::new().write(true).open(home.disk("vm")).unwrap();
    disk.set_len(len).unwrap();
    drop(disk);
    for (index, offset) in (0..len).step_by(8 << 20).enumerate() {
        write_at(&home.disk("vm"), offset, &random_bytes(8 << 20, 300 + index as u64));
    }
    let name = format!("{host}/org/big:v1");

    let (push_time, push_rss) = measured(home.tart().args(["push", "--insecure", "vm", &name]));
    let other = Home::new();
    let (pull_time, pull_rss) = measured(other.tart().args(["pull", "--insecure", &name]));
    let digest = tart_testkit::sha256_digest(&registry.manifest("org/big", "v1").0);
    assert_same_file(
        &other.image_dir(host, "org/big", &digest).join("disk.img"),
        &home.disk("vm"),
    );
    eprintln!(
        "incompressible {} MiB disk: push {:.1} s, peak RSS {} MiB; pull {:.1} s, peak RSS {} MiB",
        len >> 20,
        push_time.as_secs_f64(),
        push_rss >> 20,
        pull_time.as_secs_f64(),
        pull_rss >> 20
    );
    assert!(push_rss < MEMORY_BOUND, "push peaked at {} MiB", push_rss >> 20);
    assert!(pull_rss < MEMORY_BOUND, "pull peaked at {} MiB", pull_rss >> 20);
    assert!(
        std::fs::read_dir(home.root.join("tmp")).unwrap().next().is_none(),
        "push left files in tmp/"
    );
}
