//! A small builder around the `flow` binary: a temp folder with files, args, env; then the output.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

pub struct Sandbox {
    pub dir: tempfile::TempDir,
}

pub struct Ran {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

impl From<Output> for Ran {
    fn from(o: Output) -> Self {
        Ran {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// The default models, fetched once per test process if they are not there yet.
pub fn models_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out =
            Command::new(env!("CARGO_BIN_EXE_flow")).args(["models", "pull", "--quiet"]).output().expect("run flow");
        assert!(out.status.success(), "flow models pull failed: {}", String::from_utf8_lossy(&out.stderr));
        flow::models::models_dir()
    })
    .clone()
}

impl Sandbox {
    pub fn new() -> Sandbox {
        Sandbox { dir: tempfile::tempdir().expect("tempdir") }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, contents: impl AsRef<[u8]>) -> &Self {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, contents).unwrap();
        self
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_flow"));
        c.args(args).current_dir(self.dir.path()).env("FLOW_MODELS", models_dir()).stdin(Stdio::null());
        c
    }

    pub fn flow(&self, args: &[&str]) -> Ran {
        self.cmd(args).output().expect("run flow").into()
    }

    pub fn db(&self, name: &str) -> Db {
        Db { path: self.path(name) }
    }
}

/// Read-only queries against a store, through sqlx like the binary.
pub struct Db {
    pub path: PathBuf,
}

impl Db {
    pub fn scalar(&self, sql: &str) -> i64 {
        self.try_scalar(sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Like `scalar`, for polling a store that a running process may still be creating.
    pub fn try_scalar(&self, sql: &str) -> Result<i64, sqlx::Error> {
        self.one::<i64>(sql)
    }

    pub fn real(&self, sql: &str) -> f64 {
        self.one::<f64>(sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    pub fn text(&self, sql: &str) -> String {
        self.one::<String>(sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    fn one<T>(&self, sql: &str) -> Result<T, sqlx::Error>
    where
        T: for<'r> sqlx::Decode<'r, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite> + Send + Unpin + 'static,
    {
        let path = self.path.clone();
        let sql = sql.to_string();
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async move {
            use sqlx::ConnectOptions;
            let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(&path)
                .busy_timeout(std::time::Duration::from_secs(10))
                .connect()
                .await?;
            sqlx::query_scalar::<_, T>(&sql).fetch_one(&mut conn).await
        })
    }

    /// Writes test fixtures straight into the store (for tables no stage fills yet).
    pub fn execute(&self, sql: &str) {
        let path = self.path.clone();
        let sql = sql.to_string();
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async move {
            use sqlx::{ConnectOptions, Executor};
            let mut conn = sqlx::sqlite::SqliteConnectOptions::new().filename(&path).connect().await.unwrap();
            conn.execute(sqlx::raw_sql(&sql)).await.unwrap();
        })
    }
}

/// Deterministic prose-like text: paragraphs of sentences, `n_paras` of them.
pub fn prose(seed: u64, n_paras: usize) -> String {
    const WORDS: &[&str] = &[
        "revenue",
        "grew",
        "in",
        "the",
        "cloud",
        "segment",
        "while",
        "operating",
        "margins",
        "improved",
        "because",
        "of",
        "lower",
        "input",
        "costs",
        "and",
        "higher",
        "pricing",
        "across",
        "all",
        "regions",
        "customers",
        "renewed",
        "contracts",
        "at",
        "record",
        "rates",
        "during",
        "fourth",
        "quarter",
        "management",
        "expects",
        "capital",
        "expenditure",
        "to",
        "rise",
        "next",
        "year",
        "as",
        "new",
        "facilities",
        "open",
    ];
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut next = |m: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % m as u64) as usize
    };
    let mut paras = Vec::new();
    for _ in 0..n_paras {
        let mut sents = Vec::new();
        for _ in 0..3 + next(5) {
            let n = 8 + next(14);
            let s: Vec<&str> = (0..n).map(|_| WORDS[next(WORDS.len())]).collect();
            let mut s = s.join(" ");
            s[..1].make_ascii_uppercase();
            sents.push(format!("{s}."));
        }
        paras.push(sents.join(" "));
    }
    paras.join("\n\n")
}

/// A minimal valid PDF with one text line per page, written by hand so the test needs no PDF library.
pub fn pdf(pages: &[&str]) -> Vec<u8> {
    let n = pages.len();
    let mut objs: Vec<String> = Vec::new();
    objs.push("<< /Type /Catalog /Pages 2 0 R >>".into());
    let kids: Vec<String> = (0..n).map(|i| format!("{} 0 R", 4 + 2 * i)).collect();
    objs.push(format!("<< /Type /Pages /Kids [{}] /Count {n} >>", kids.join(" ")));
    objs.push("<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>".into());
    for (i, text) in pages.iter().enumerate() {
        objs.push(format!(
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> /Contents {} 0 R >>",
            5 + 2 * i
        ));
        let stream = format!("BT /F1 12 Tf 72 720 Td ({}) Tj ET", text.replace('(', "\\(").replace(')', "\\)"));
        objs.push(format!("<< /Length {} >>\nstream\n{stream}\nendstream", stream.len()));
    }
    let mut out = b"%PDF-1.4\n".to_vec();
    let mut offsets = Vec::new();
    for (i, o) in objs.iter().enumerate() {
        offsets.push(out.len());
        out.extend_from_slice(format!("{} 0 obj\n{o}\nendobj\n", i + 1).as_bytes());
    }
    let xref = out.len();
    out.extend_from_slice(format!("xref\n0 {}\n0000000000 65535 f \n", objs.len() + 1).as_bytes());
    for off in offsets {
        out.extend_from_slice(format!("{off:010} 00000 n \n").as_bytes());
    }
    out.extend_from_slice(
        format!("trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n", objs.len() + 1).as_bytes(),
    );
    out
}
