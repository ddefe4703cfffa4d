// Embedded migrations (sqlx::migrate!) must be rebuilt when a migration file is added. The binary
// finds llama.cpp's shared libraries where llama-cpp-sys-2 built them, or beside itself (a copied
// install with the libraries next to it).
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=migrations");
    let mut paths = vec!["$ORIGIN".to_string()];
    if let Ok(backends) = std::env::var("DEP_LLAMA_BACKENDS_DIR")
        && let Some(out) = Path::new(&backends).parent()
    {
        let lib = out.join("lib");
        paths.push(lib.display().to_string());
        if let Some(profile) = std::env::var_os("OUT_DIR").as_deref().and_then(|o| Path::new(o).ancestors().nth(3)) {
            for dir in [profile.to_path_buf(), profile.join("deps"), profile.join("examples")] {
                complete_links(&lib, &dir);
            }
        }
    }
    let rpath = paths.join(":");
    println!("cargo:rustc-link-arg-bins=-Wl,-rpath,{rpath}");
    println!("cargo:rustc-link-arg-examples=-Wl,-rpath,{rpath}");
    println!("cargo:rustc-link-arg-tests=-Wl,-rpath,{rpath}");
}

/// llama-cpp-sys-2 links `libllama.so` (a symlink to `libllama.so.0`) into the target folders but
/// not what it points at, so the link dangles and its next build script run fails on
/// `hard_link(..) -> AlreadyExists` (it tests `exists()`, which follows the link). Placing the
/// versioned files beside those links makes them resolve, for that check and for `$ORIGIN`.
fn complete_links(lib: &Path, dir: &Path) {
    let (Ok(entries), true) = (std::fs::read_dir(lib), dir.is_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().contains(".so.") {
            continue;
        }
        let dst = dir.join(&name);
        if dst.symlink_metadata().is_ok() {
            continue;
        }
        let src = entry.path();
        let made = match std::fs::read_link(&src) {
            Ok(target) => std::os::unix::fs::symlink(target, &dst),
            Err(_) => std::fs::hard_link(&src, &dst).or_else(|_| std::fs::copy(&src, &dst).map(|_| ())),
        };
        if let Err(e) = made {
            println!("cargo:warning=could not place {} in {}: {e}", src.display(), dir.display());
        }
    }
}
