//! The weights the engine loads: the GGUF as given, or a Q8_0 copy made once where the CPU's matrix
//! units (AMX) have kernels for Q8_0 but not for most of the GGUF's own matrices (Q5_0, F16, ...).

use std::ffi::CString;
use std::path::{Path, PathBuf};

use llama_cpp_sys_2 as sys;

use crate::error::{Error, Result};
use crate::llm::gguf::{self, Checked};
use crate::workflow::Requantize;

/// The types llama.cpp's AMX kernels take (ggml-cpu/amx/common.h, `qtype_has_amx_kernels`).
fn has_amx_kernels(t: sys::ggml_type) -> bool {
    matches!(
        t,
        sys::GGML_TYPE_Q4_0
            | sys::GGML_TYPE_Q4_1
            | sys::GGML_TYPE_Q8_0
            | sys::GGML_TYPE_Q4_K
            | sys::GGML_TYPE_Q5_K
            | sys::GGML_TYPE_Q6_K
            | sys::GGML_TYPE_IQ4_XS
    )
}

/// Whether the CPU kernels llama.cpp loaded (the best variant for this CPU) use AMX.
fn amx_kernels_loaded() -> bool {
    // SAFETY: llama.cpp returns a static NUL-terminated string.
    let info = unsafe { std::ffi::CStr::from_ptr(sys::llama_print_system_info()) };
    info.to_string_lossy().contains("AMX_INT8 = 1")
}

/// The file to load for the GGUF at `path`, and why when it is a Q8_0 copy. Requantizing keeps
/// each weight to within half a Q8_0 step (1/254 of its block's largest value); on a Sapphire
/// Rapids core it made prompts 3.2x and decoding 1.4x faster (BENCHMARKS.md).
pub fn choose(path: &Path, checked: &Checked, how: Requantize, cache: &Path) -> Result<(PathBuf, Option<String>)> {
    let share = checked.share_of(has_amx_kernels);
    let wanted = match how {
        Requantize::Never => false,
        Requantize::Q8_0 => checked.share_of(|t| t == sys::GGML_TYPE_Q8_0) < 0.99,
        Requantize::Auto => share < 0.5 && amx_kernels_loaded(),
    };
    if !wanted {
        return Ok((path.to_path_buf(), None));
    }
    let head = gguf::head_digest(path)?;
    let out = cache.join(format!("{head}-{}.q8_0.gguf", checked.size));
    let mut main: Vec<_> = checked.bytes_by_type.iter().filter(|(t, _)| !has_amx_kernels(*t)).collect();
    main.sort_by_key(|(_, b)| std::cmp::Reverse(*b));
    let types: Vec<String> = main.iter().take(3).map(|(t, _)| gguf::type_name(*t)).collect();
    let why = format!(
        "{} as Q8_0 ({:.0}% of its weights are {}, which AMX has no kernels for; `requantize: never` loads it as it is)",
        path.display(),
        (1.0 - share) * 100.0,
        types.join("/")
    );
    if !out.is_file() {
        write_q8_0(path, &out)?;
    }
    Ok((out, Some(why)))
}

/// Writes the Q8_0 copy of `src` at `out` through a temporary file, so a killed run or a second
/// process never leaves or loads a half-written model.
fn write_q8_0(src: &Path, out: &Path) -> Result<()> {
    let dir = out.parent().expect("a file in a folder");
    std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    let tmp =
        dir.join(format!(".{}.{}.tmp", out.file_name().unwrap_or_default().to_string_lossy(), std::process::id()));
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_encoded_bytes())
            .map_err(|_| Error::bad_input(format!("a NUL byte in {}", p.display()), "rename it"))
    };
    let (c_src, c_tmp) = (c(src)?, c(&tmp)?);
    // SAFETY: plain parameters from llama.cpp's defaults, and two valid C strings.
    let rc = unsafe {
        let mut p = sys::llama_model_quantize_default_params();
        p.ftype = sys::LLAMA_FTYPE_MOSTLY_Q8_0;
        p.allow_requantize = true;
        p.nthread = std::thread::available_parallelism().map(|n| n.get() as i32).unwrap_or(2);
        sys::llama_model_quantize(c_src.as_ptr(), c_tmp.as_ptr(), &p)
    };
    if rc != 0 {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::bad_input(
            format!("llama.cpp could not requantize {} to Q8_0 (code {rc})", src.display()),
            "set `requantize: never` on the model to load it as it is",
        ));
    }
    std::fs::rename(&tmp, out).map_err(Error::io(out))
}
