//! The module layering the README's Layout section lists: each top-level module of src/ imports
//! only from layers below its own. Reads the source, so a new upward import fails here.

use std::collections::BTreeMap;
use std::path::Path;

/// Each module's layer in the README's list (1 is the bottom).
fn readme_layers() -> BTreeMap<String, usize> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let section = readme.split("\n## Layout").nth(1).expect("README has a Layout section");
    let mut layers = BTreeMap::new();
    // Lines such as "3. `digest`, `text`: what they are"; the names come before the colon.
    for line in section.lines().take_while(|l| !l.starts_with("## ")) {
        let Some((num, rest)) = line.split_once(". ") else { continue };
        let Ok(n) = num.trim().parse::<usize>() else { continue };
        let names = rest.split_once(": ").map_or(rest, |(names, _)| names);
        for name in names.split('`').skip(1).step_by(2) {
            assert!(layers.insert(name.to_string(), n).is_none(), "`{name}` is in two layers of the README");
        }
    }
    layers
}

/// Every `crate::<module>` a file names outside its unit tests.
fn imports(source: &str) -> Vec<String> {
    let code = source.split("#[cfg(test)]").next().unwrap_or_default();
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a, b::c}`: each top-level name in the braces.
            let (mut depth, mut name, mut at_start) = (1, String::new(), true);
            for ch in group.chars() {
                match ch {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 1 => {
                        if !name.is_empty() {
                            out.push(std::mem::take(&mut name));
                        }
                        at_start = true;
                    }
                    c if at_start && (c.is_ascii_lowercase() || c == '_') => name.push(c),
                    _ if !name.is_empty() => {
                        out.push(std::mem::take(&mut name));
                        at_start = false;
                    }
                    _ => {}
                }
                if depth == 0 {
                    break;
                }
            }
            if !name.is_empty() {
                out.push(name);
            }
        } else {
            let name: String = rest.chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
            out.push(name);
        }
    }
    out
}

fn top_modules(src: &Path) -> Vec<(String, Vec<std::path::PathBuf>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(src).unwrap().flatten() {
        let p = e.path();
        let name = p.file_stem().unwrap().to_string_lossy().to_string();
        // The binary's own files sit above the library.
        if ["main", "lib", "cli", "commands"].contains(&name.as_str()) {
            continue;
        }
        let mut files = Vec::new();
        let mut todo = vec![p.clone()];
        while let Some(f) = todo.pop() {
            if f.is_dir() {
                todo.extend(std::fs::read_dir(&f).unwrap().flatten().map(|e| e.path()));
            } else if f.extension().is_some_and(|x| x == "rs") {
                files.push(f);
            }
        }
        out.push((name, files));
    }
    out
}

#[test]
fn modules_import_only_from_lower_layers() {
    let layers = readme_layers();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut problems = Vec::new();
    for (module, files) in top_modules(&src) {
        let Some(&own) = layers.get(&module) else {
            problems.push(format!("src/{module} is in no layer of the README's Layout section"));
            continue;
        };
        for f in files {
            for used in imports(&std::fs::read_to_string(&f).unwrap()) {
                if used == module || used.is_empty() {
                    continue;
                }
                match layers.get(&used) {
                    Some(&l) if l < own => {}
                    Some(&l) => problems.push(format!(
                        "{} (layer {own}, `{module}`) imports `{used}` (layer {l}): only lower layers may be imported",
                        f.strip_prefix(env!("CARGO_MANIFEST_DIR")).unwrap().display()
                    )),
                    None => problems.push(format!("{} imports `{used}`, which is in no layer", f.display())),
                }
            }
        }
    }
    assert!(problems.is_empty(), "layering broken:\n{}", problems.join("\n"));
}

#[test]
fn the_import_reader_sees_groups_and_paths() {
    let src =
        "use crate::a::X;\nuse crate::{b, c::{D, E}, d_e::F};\nfn f() { crate::g::h() }\n#[cfg(test)]\nuse crate::z;";
    assert_eq!(imports(src), ["a", "b", "c", "d_e", "g"]);
}
