//! What a GGUF file says besides its tensors: the tokenizer (BPE vocabulary, merges, special
//! tokens, built into a `tokenizers::Tokenizer`) and the chat template (rendered with minijinja).

use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use minijinja::Environment;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{Error, Result};

/// GGUF token types (llama.cpp): 3 is a control token such as `<|im_start|>`, 4 a user-defined
/// one such as Qwen's `<tool_call>`; both are matched whole in text, as Hugging Face's added tokens are.
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Qwen2's pre-tokenizer split (its tokenizer.json, and llama.cpp's `qwen2` pre-tokenizer): one
/// number digit at a time, letters with at most one leading non-letter, punctuation runs, newlines.
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub fn read(path: &Path) -> Result<(Content, std::fs::File)> {
    let mut file = std::fs::File::open(path).map_err(Error::io(path))?;
    let content = Content::read(&mut file).map_err(|e| {
        Error::bad_input(
            format!("{} is not a readable GGUF file: {e}", path.display()),
            "expected a GGUF v2/v3 model file (e.g. SmolLM2-135M-Instruct.Q4_1.gguf); run `flow models pull`",
        )
    })?;
    Ok((content, file))
}

fn meta<'a>(c: &'a Content, path: &Path, key: &str) -> Result<&'a Value> {
    c.metadata.get(key).ok_or_else(|| {
        Error::bad_input(
            format!("{}: the GGUF metadata has no `{key}`", path.display()),
            "the file needs an embedded tokenizer and chat template (llama.cpp's convert script writes them)",
        )
    })
}

fn strings(v: &Value, path: &Path, key: &str) -> Result<Vec<String>> {
    let bad =
        || Error::bad_input(format!("{}: `{key}` is not a list of strings", path.display()), "re-convert the model");
    v.to_vec().map_err(|_| bad())?.iter().map(|x| x.to_string().cloned().map_err(|_| bad())).collect()
}

/// The GGUF's BPE tokenizer as a `tokenizers::Tokenizer`: byte-level BPE whose pre-tokenizer is
/// picked by `tokenizer.ggml.pre` (`qwen2`: Qwen's split regex; `smollm` and others: digits one by
/// one then GPT-2's split, as SmolLM's tokenizer.json), and control tokens registered as special.
pub fn tokenizer(c: &Content, path: &Path) -> Result<Tokenizer> {
    let model = meta(c, path, "tokenizer.ggml.model")?.to_string().cloned().unwrap_or_default();
    if model != "gpt2" {
        return Err(Error::bad_input(
            format!("{}: tokenizer model `{model}` is not supported (byte-level BPE, `gpt2`, is)", path.display()),
            "use a llama or qwen2 GGUF with a BPE tokenizer, such as SmolLM2 or Qwen2.5",
        ));
    }
    let tokens = strings(meta(c, path, "tokenizer.ggml.tokens")?, path, "tokenizer.ggml.tokens")?;
    let merges = strings(meta(c, path, "tokenizer.ggml.merges")?, path, "tokenizer.ggml.merges")?;
    let types: Vec<i32> = match c.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v.to_vec().map(|xs| xs.iter().map(|x| x.to_i32().unwrap_or(1)).collect()).unwrap_or_default(),
        None => vec![],
    };
    let vocab: ahash::AHashMap<String, u32> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let merges: Vec<(String, String)> =
        merges.iter().filter_map(|m| m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string()))).collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| {
        Error::bad_input(format!("{}: bad BPE vocabulary: {e}", path.display()), "re-convert the model")
    })?;
    let mut tok = Tokenizer::new(bpe);
    let pre = c.metadata.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).map(String::as_str);
    let pre_tokenizer = match pre {
        Some("qwen2") => {
            let split = Split::new(SplitPattern::Regex(QWEN2_SPLIT.into()), SplitDelimiterBehavior::Isolated, false)
                .expect("the Qwen2 split pattern compiles");
            // The regex already split the text: ByteLevel only maps bytes to its alphabet.
            Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()])
        }
        _ => Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]),
    };
    tok.with_pre_tokenizer(Some(pre_tokenizer));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    let special: Vec<AddedToken> = tokens
        .iter()
        .zip(types.iter().chain(std::iter::repeat(&1)))
        .filter(|(_, t)| **t == TOKEN_TYPE_CONTROL || **t == TOKEN_TYPE_USER_DEFINED)
        .map(|(s, _)| AddedToken::from(s.clone(), true))
        .collect();
    tok.add_special_tokens(special).map_err(|e| {
        Error::bad_input(format!("{}: bad special tokens: {e}", path.display()), "re-convert the model")
    })?;
    Ok(tok)
}

/// The token id of `key` (e.g. `tokenizer.ggml.eos_token_id`), if the metadata has it.
pub fn token_id(c: &Content, key: &str) -> Option<u32> {
    c.metadata.get(key).and_then(|v| v.to_u32().ok())
}

/// The chat template from the GGUF, rendered the way Hugging Face's `apply_chat_template` does.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    pub fn from_gguf(c: &Content, path: &Path, tok: &Tokenizer) -> Result<ChatTemplate> {
        let source = meta(c, path, "tokenizer.chat_template")?.to_string().cloned().unwrap_or_default();
        let name = |key: &str| token_id(c, key).and_then(|id| tok.id_to_token(id)).unwrap_or_default();
        ChatTemplate::new(&source, &name("tokenizer.ggml.bos_token_id"), &name("tokenizer.ggml.eos_token_id"))
    }

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
