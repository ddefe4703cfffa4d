//! What flow reads of a GGUF file itself: that it is whole (every tensor's bytes are there), its
//! chat template (rendered with minijinja, as Hugging Face's `apply_chat_template` does), its
//! tensor types, and a digest of its head that names the weights in request keys.

use std::ffi::{CStr, CString};
use std::path::Path;

use llama_cpp_sys_2 as sys;
use minijinja::Environment;

use crate::error::{Error, Result};

/// A GGUF header as ggml itself parses it (so every tensor type llama.cpp knows is read), freed on
/// drop. ggml asserts (aborts) on a value read with the wrong type, so every read checks it first.
struct Header {
    ctx: *mut sys::gguf_context,
}

impl Drop for Header {
    fn drop(&mut self) {
        // SAFETY: `ctx` came from gguf_init_from_file and is freed once.
        unsafe { sys::gguf_free(self.ctx) }
    }
}

impl Header {
    fn open(path: &Path) -> Result<Header> {
        let bad = |why: &str| {
            Error::bad_input(
                format!("{} is not a readable GGUF file ({why})", path.display()),
                "expected a GGUF v2/v3 model file (e.g. SmolLM2-135M-Instruct.Q4_1.gguf); run `flow models pull`",
            )
        };
        std::fs::File::open(path).map_err(Error::io(path))?;
        let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| bad("a NUL byte in its path"))?;
        let params = sys::gguf_init_params { no_alloc: true, ctx: std::ptr::null_mut() };
        // SAFETY: a valid C string; with no_alloc and no ggml context only the header is read.
        let ctx = unsafe { sys::gguf_init_from_file(c.as_ptr(), params) };
        if ctx.is_null() {
            return Err(bad("ggml could not parse its header"));
        }
        Ok(Header { ctx })
    }

    fn key(&self, key: &str) -> Option<i64> {
        let c = CString::new(key).ok()?;
        // SAFETY: a live context and a C string.
        let id = unsafe { sys::gguf_find_key(self.ctx, c.as_ptr()) };
        (id >= 0).then_some(id)
    }

    fn string(&self, key: &str) -> Option<String> {
        let id = self.key(key)?;
        // SAFETY: the key exists; its type is checked before the string is read.
        unsafe {
            (sys::gguf_get_kv_type(self.ctx, id) == sys::GGUF_TYPE_STRING)
                .then(|| CStr::from_ptr(sys::gguf_get_val_str(self.ctx, id)).to_string_lossy().into_owned())
        }
    }

    /// The text of the token whose id `key` holds, from the vocabulary in `tokenizer.ggml.tokens`.
    fn token_text(&self, key: &str) -> Option<String> {
        let id = self.key(key)?;
        // SAFETY: types and bounds are checked before each read.
        unsafe {
            if sys::gguf_get_kv_type(self.ctx, id) != sys::GGUF_TYPE_UINT32 {
                return None;
            }
            let token = sys::gguf_get_val_u32(self.ctx, id) as usize;
            let tokens = self.key("tokenizer.ggml.tokens")?;
            let ok = sys::gguf_get_kv_type(self.ctx, tokens) == sys::GGUF_TYPE_ARRAY
                && sys::gguf_get_arr_type(self.ctx, tokens) == sys::GGUF_TYPE_STRING
                && token < sys::gguf_get_arr_n(self.ctx, tokens);
            ok.then(|| CStr::from_ptr(sys::gguf_get_arr_str(self.ctx, tokens, token)).to_string_lossy().into_owned())
        }
    }

    /// Each tensor's type, and where its bytes end in the file.
    fn tensors(&self) -> Vec<(sys::ggml_type, u64, u64)> {
        // SAFETY: ids within gguf_get_n_tensors of a live context.
        unsafe {
            let base = sys::gguf_get_data_offset(self.ctx) as u64;
            (0..sys::gguf_get_n_tensors(self.ctx))
                .map(|i| {
                    let size = sys::gguf_get_tensor_size(self.ctx, i) as u64;
                    (
                        sys::gguf_get_tensor_type(self.ctx, i),
                        size,
                        base + sys::gguf_get_tensor_offset(self.ctx, i) as u64 + size,
                    )
                })
                .collect()
        }
    }
}

/// What `check` found: the chat template, the file's size, and its tensor bytes by ggml type.
pub struct Checked {
    pub template: ChatTemplate,
    pub size: u64,
    pub bytes_by_type: Vec<(sys::ggml_type, u64)>,
}

impl Checked {
    /// The share of the tensor bytes in types `f` holds for.
    pub fn share_of(&self, f: impl Fn(sys::ggml_type) -> bool) -> f64 {
        let all: u64 = self.bytes_by_type.iter().map(|(_, b)| b).sum();
        let some: u64 = self.bytes_by_type.iter().filter(|(t, _)| f(*t)).map(|(_, b)| b).sum();
        if all == 0 { 0.0 } else { some as f64 / all as f64 }
    }
}

/// The name ggml gives a tensor type (`q8_0`, `q5_0`, `iq4_xs`, ...).
pub fn type_name(t: sys::ggml_type) -> String {
    // SAFETY: ggml returns a static string for any type id.
    unsafe { CStr::from_ptr(sys::ggml_type_name(t)).to_string_lossy().into_owned() }
}

/// Checks the file at `path`: a GGUF whose tensors all fit in the file (a copy cut short is named
/// now, not at the first request) and that carries a chat template.
pub fn check(path: &Path) -> Result<Checked> {
    let header = Header::open(path)?;
    let tensors = header.tensors();
    let need = tensors.iter().map(|t| t.2).max().unwrap_or(0);
    let have = std::fs::metadata(path).map_err(Error::io(path))?.len();
    if have < need {
        return Err(Error::bad_input(
            format!("{}: the file is cut short ({have} of the {need} bytes its header names)", path.display()),
            "the download or copy was interrupted: run `flow models pull` again",
        ));
    }
    let source = header.string("tokenizer.chat_template").ok_or_else(|| {
        Error::bad_input(
            format!("{}: the GGUF metadata has no `tokenizer.chat_template`", path.display()),
            "the file needs an embedded tokenizer and chat template (llama.cpp's convert script writes them)",
        )
    })?;
    let name = |key: &str| header.token_text(key).unwrap_or_default();
    let template =
        ChatTemplate::new(&source, &name("tokenizer.ggml.bos_token_id"), &name("tokenizer.ggml.eos_token_id"))?;
    let mut bytes_by_type: Vec<(sys::ggml_type, u64)> = Vec::new();
    for (t, size, _) in tensors {
        match bytes_by_type.iter_mut().find(|(k, _)| *k == t) {
            Some((_, b)) => *b += size,
            None => bytes_by_type.push((t, size)),
        }
    }
    Ok(Checked { template, size: have, bytes_by_type })
}

/// A digest of the file's first 8 MiB (its metadata, vocabulary and first tensors): with its size,
/// what names these weights in request keys without hashing a gigabyte at every start.
pub fn head_digest(path: &Path) -> Result<String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(Error::io(path))?;
    let digest = crate::digest::sha256_reader(file.take(8 << 20)).map_err(Error::io(path))?;
    Ok(digest[..16].to_string())
}

/// The chat template from the GGUF, rendered the way Hugging Face's `apply_chat_template` does.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.to_string()).map_err(|e| {
            Error::bad_input(format!("the model's chat template does not parse: {e}"), "re-convert the model")
        })?;
        Ok(ChatTemplate { env, bos: bos.to_string(), eos: eos.to_string() })
    }

    pub fn render(&self, messages: &[crate::llm::Message]) -> Result<String> {
        let t = self.env.get_template("chat").expect("added above");
        t.render(minijinja::context! {
            messages => messages, add_generation_prompt => true, bos_token => self.bos, eos_token => self.eos,
        })
        .map_err(|e| {
            Error::bad_input(
                format!("the model's chat template (in its GGUF metadata) cannot be rendered: {e}"),
                "use a GGUF whose `tokenizer.chat_template` is a Jinja template, such as the default model (`flow models pull`)",
            )
        })
    }
}
