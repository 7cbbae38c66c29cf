use super::*;

#[test]
fn user_data_must_be_cloud_config_or_a_script() {
    assert!(validate_user_data("f", b"#cloud-config\nruncmd: []\n").is_ok());
    assert!(validate_user_data("f", b"#!/bin/sh\ntrue\n").is_ok());
    assert!(validate_user_data("f", b"\xef\xbb\xbf#cloud-config\n").is_ok());
    for bad in [&b""[..], b"runcmd: []\n", b" #cloud-config", b"<html>"] {
        let err = validate_user_data("x.yaml", bad).unwrap_err().to_string();
        assert!(err.starts_with("x.yaml is not cloud-init user-data"), "{err}");
    }
}

#[test]
fn default_user_data_is_the_tart_convention() {
    let text = String::from_utf8(default_user_data(&["ssh-ed25519 AAAA me@host".into()])).unwrap();
    assert!(text.starts_with("#cloud-config\n"));
    assert!(text.contains("- name: admin"));
    assert!(text.contains("NOPASSWD:ALL"));
    assert!(text.contains("password: admin"));
    assert!(text.contains("      - \"ssh-ed25519 AAAA me@host\"\n"));
    assert!(!String::from_utf8(default_user_data(&[]))
        .unwrap()
        .contains("ssh_authorized_keys"));
}

#[test]
fn meta_data_quotes_and_sanitises() {
    let text = String::from_utf8(meta_data("iid-1", "my_vm.1")).unwrap();
    assert_eq!(text, "instance-id: \"iid-1\"\nlocal-hostname: \"my-vm-1\"\n");
    assert_eq!(hostname_for("__"), "tart");
}

#[test]
fn renewed_seed_is_a_new_instance_with_the_same_user_data() {
    let seed = Seed::new(b"#cloud-config\n".to_vec(), "a");
    let clone = seed.renewed("b");
    assert_ne!(seed.instance_id(), clone.instance_id());
    assert!(clone.instance_id().unwrap().starts_with("iid-"));
    assert_eq!(seed.user_data, clone.user_data);
    assert!(String::from_utf8_lossy(&clone.meta_data).contains("local-hostname: \"b\""));
}

#[test]
fn save_load_and_missing_files() {
    let vm = tempfile::tempdir().unwrap();
    let dir = vm.path().join("cloud-init");
    assert_eq!(Seed::load(&dir).unwrap(), None);
    let mut seed = Seed::new(b"#cloud-config\n".to_vec(), "vm");
    seed.network_config = Some(b"version: 2\n".to_vec());
    seed.save(&dir).unwrap();
    assert_eq!(Seed::load(&dir).unwrap(), Some(seed.clone()));
    seed.network_config = None;
    seed.save(&dir).unwrap();
    assert_eq!(Seed::load(&dir).unwrap(), Some(seed));
    fs::remove_file(dir.join(META_DATA)).unwrap();
    let err = Seed::load(&dir).unwrap_err().to_string();
    assert!(err.contains("has no meta-data"), "{err}");
}

#[test]
fn cidata_image_holds_the_files_under_the_label() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cidata.img");
    let seed = Seed::new(default_user_data(&[]), "vm");
    write_cidata_image(&seed, &path).unwrap();
    let mut file = fs::File::open(&path).unwrap();
    let fs = fatfs::FileSystem::new(&mut file, fatfs::FsOptions::new()).unwrap();
    assert_eq!(fs.volume_label(), "CIDATA");
    let mut names: Vec<String> = fs.root_dir().iter().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names, ["meta-data", "user-data"]);
    let mut text = String::new();
    io::Read::read_to_string(&mut fs.root_dir().open_file("user-data").unwrap(), &mut text).unwrap();
    assert_eq!(text.as_bytes(), seed.user_data);
    // Never over an existing file.
    assert!(write_cidata_image(&seed, &path).is_err());
}
