//! bf16 matrix products on Intel AMX tiles (f32 accumulation) for the packed CPU encoder and its
//! backward pass, used where the CPU and the kernel allow it; every other CPU keeps the f32 path.
//!
//! Written by hand because nothing else does it: no well-kept Rust crate has an AMX GEMM (gemm has
//! none, candle's CPU backend has none), and Rust's AMX intrinsics are unstable, so the tile
//! instructions are inline `asm!` (stable). The blocking follows the usual AMX design (oneDNN's
//! brgemm, llama.cpp's mmq): a 2x2 block of 16x16 f32 accumulator tiles, so each step of 32 along K
//! loads two A tiles and two B tiles for four tile products; B (weights) is packed once into the
//! tiles' "VNNI" layout, A (activations) is converted to bf16 one 32-row panel at a time.

use std::arch::asm;
use std::sync::OnceLock;

use candle_transformers::models::bert::HiddenAct;
use rayon::prelude::*;

use super::kernels::apply;

mod fused;
mod operands;
pub(crate) use fused::{attention_head, mlp};
pub use operands::{Aligned, Lhs, PackedB, bf16};
use operands::{convert_panel, convert32, convert32_scaled};

/// Rows (and columns) of one register block: 2x2 tiles of 16.
const BLOCK: usize = 32;
/// bf16 values in one tile (16 rows of 64 bytes).
const TILE: usize = 512;

/// What runs the bf16 products here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// AMX tiles: the CPU has AMX-TILE and AMX-BF16, the OS saves the tile state (XCR0), and Linux
    /// granted this process the tile data (`arch_prctl(ARCH_REQ_XCOMP_PERM)`, without which the
    /// first tile load is SIGILL).
    Amx,
    /// AVX512-BF16's `vdpbf16ps` on the same packed operands, for CPUs with it but no AMX (Cooper
    /// Lake, Zen 4): 32 bf16 products an instruction against f32's 16. Only when asked for: on the
    /// one CPU measured (Sapphire Rapids) it embeds at 0.65x the f32 path (BENCHMARKS.md, issue
    /// 30), so `auto` does not choose it.
    Avx512Bf16,
}

/// The engine for bf16 products, decided once per process; None: the f32 path serves this CPU.
/// `FLOW_BF16_ENGINE=avx512bf16` asks for the AVX512-BF16 engine (on a CPU without AMX, or to
/// measure it on one with); `FLOW_BF16_ENGINE=off` turns bf16 off.
pub fn engine() -> Option<Engine> {
    static ENGINE: OnceLock<Option<Engine>> = OnceLock::new();
    *ENGINE.get_or_init(|| match std::env::var("FLOW_BF16_ENGINE").unwrap_or_default().as_str() {
        "off" => None,
        _ if !wide_vectors() => None,
        "avx512bf16" => Some(Engine::Avx512Bf16),
        _ => (cpu_and_os() && request_permission()).then_some(Engine::Amx),
    })
}

impl Engine {
    /// How the products run, in words for logs ("bf16 products on AMX tiles").
    pub fn describe(self) -> &'static str {
        match self {
            Engine::Amx => "on AMX tiles",
            Engine::Avx512Bf16 => "with AVX512-BF16",
        }
    }
}

/// Whether bf16 products can run here (on AMX or on AVX512-BF16).
pub fn available() -> bool {
    engine().is_some()
}

fn tiles() -> bool {
    engine() == Some(Engine::Amx)
}

/// AVX512-BF16 with the AVX-512 subsets the code around the products is compiled for (conversion,
/// the output's bias and sums): every AMX CPU has them.
fn wide_vectors() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bf16")
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512dq")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(target_arch = "x86_64")]
fn cpu_and_os() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    // SAFETY: CPUID is present on every x86-64 CPU; XGETBV only runs once OSXSAVE says it may.
    unsafe {
        if __cpuid(0).eax < 7 {
            return false;
        }
        let l7 = __cpuid_count(7, 0);
        let (amx_bf16, amx_tile) = ((l7.edx >> 22) & 1 == 1, (l7.edx >> 24) & 1 == 1);
        let osxsave = (__cpuid(1).ecx >> 27) & 1 == 1;
        if !(amx_bf16 && amx_tile && osxsave) {
            return false;
        }
        let (lo, _hi): (u32, u32);
        asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") _hi, options(nomem, nostack, preserves_flags));
        // XTILECFG (bit 17) and XTILEDATA (bit 18) enabled by the OS.
        (lo >> 17) & 3 == 3
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_and_os() -> bool {
    false
}

#[cfg(target_os = "linux")]
fn request_permission() -> bool {
    const SYS_ARCH_PRCTL: libc::c_long = 158;
    const ARCH_GET_XCOMP_PERM: libc::c_long = 0x1022;
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these codes only reads the integer arguments and writes one u64.
    unsafe {
        if libc::syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0 {
            return false;
        }
        let mut granted: u64 = 0;
        libc::syscall(SYS_ARCH_PRCTL, ARCH_GET_XCOMP_PERM, &mut granted as *mut u64) == 0
            && (granted >> XFEATURE_XTILEDATA) & 1 == 1
    }
}

#[cfg(not(target_os = "linux"))]
fn request_permission() -> bool {
    false
}

/// Row panels (of 32) a task takes together, each block of B serving all of them once loaded: 8
/// embeds 25% faster than 1 and 8% faster than 4 or 16 (MiniLM on 2 Sapphire Rapids cores).
const GROUP: usize = 8;

/// What the product does with C.
#[derive(Clone, Copy)]
pub enum Out<'a> {
    /// C = A B.
    Store,
    /// C = A B + bias (one value per column).
    Bias(&'a [f32]),
    /// C = act(A B + bias), the activation applied while the block is in cache.
    BiasAct(&'a [f32], HiddenAct),
    /// C += A B.
    Add,
}

#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// Loads the tile shape every product here uses (8 tiles of 16 rows x 64 bytes) into this thread.
/// The configuration belongs to the thread, so each task loads it before its first tile instruction.
fn configure() {
    if !tiles() {
        return;
    }
    let mut c = TileConfig { palette: 1, start_row: 0, reserved: [0; 14], colsb: [0; 16], rows: [0; 16] };
    for t in 0..8 {
        c.colsb[t] = 64;
        c.rows[t] = 16;
    }
    // SAFETY: `available()` was checked by the caller; the config is a valid palette-1 shape.
    unsafe { asm!("ldtilecfg [{}]", in(reg) &c as *const TileConfig, options(nostack, readonly, preserves_flags)) }
}

/// Lets go of the tile state, so the OS need not save 8 KiB of tiles at every switch of this thread.
fn release() {
    if !tiles() {
        return;
    }
    // SAFETY: TILERELEASE is always valid once AMX is available.
    unsafe { asm!("tilerelease", options(nostack, nomem, preserves_flags)) }
}

/// C[32x32] of one register block into `out` (row stride 32 floats): `a` is one 32-row panel of A
/// ([K/32][2][16x32] bf16), `b` one 32-column block of B, `steps` = K/32.
///
/// # Safety
/// AMX must be available and configured on this thread; `a` and `b` must hold `steps` steps of two
/// 1 KiB tiles each, 64-byte aligned; `out` must hold 1024 floats, 64-byte aligned.
#[inline(always)]
unsafe fn kernel(a: *const u16, b: *const u16, steps: usize, out: *mut f32) {
    // SAFETY: forwarded from the caller.
    unsafe { kernel_ld(a, b, steps, out, BLOCK) }
}

/// `kernel` with C's rows `ld` floats apart (`out` must then hold 32 such rows, 64-byte aligned).
#[inline(always)]
unsafe fn kernel_ld(a: *const u16, b: *const u16, steps: usize, out: *mut f32, ld: usize) {
    if !tiles() {
        // SAFETY: forwarded from the caller; the engine is AVX512-BF16.
        return unsafe { kernel_vectors(a, b, steps, out, ld) };
    }
    // SAFETY: forwarded from the caller.
    unsafe {
        asm!(
            "tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3",
            "2:",
            "tileloadd tmm4, [{a} + {s64}*1]",
            "tileloadd tmm6, [{b} + {s64}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm5, [{a} + {s64}*1 + 1024]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tileloadd tmm7, [{b} + {s64}*1 + 1024]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a}, 2048",
            "add {b}, 2048",
            "dec {steps}",
            "jnz 2b",
            "tilestored [{o0} + {ld}*1], tmm0",
            "tilestored [{o0} + {ld}*1 + 64], tmm1",
            "tilestored [{o1} + {ld}*1], tmm2",
            "tilestored [{o1} + {ld}*1 + 64], tmm3",
            a = inout(reg) a => _,
            b = inout(reg) b => _,
            s64 = in(reg) 64usize,
            steps = inout(reg) steps => _,
            o0 = in(reg) out,
            o1 = in(reg) out.add(16 * ld),
            ld = in(reg) ld * 4,
            out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
            out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
            options(nostack),
        );
    }
}

/// `kernel_ld` with AVX512-BF16 in place of the tiles, on the same packed operands: a tile row of B
/// (16 columns, a pair of K values each) is one `vdpbf16ps` operand, and a pair of A's row is
/// broadcast against it; 8 rows of C (16 zmm accumulators) at a time.
///
/// # Safety
/// As `kernel_ld`, with AVX512-BF16 in place of AMX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl,avx512dq")]
unsafe fn kernel_vectors(a: *const u16, b: *const u16, steps: usize, out: *mut f32, ld: usize) {
    use std::arch::x86_64::*;
    // SAFETY: the reads stay inside `steps` steps of two tiles of `a` and `b`, the writes inside
    // 32 rows of 32 floats at stride `ld` of `out`, as the caller promised.
    unsafe {
        for rows in 0..BLOCK / 8 {
            let mut acc = [[_mm512_setzero_ps(); 2]; 8];
            for s in 0..steps {
                let (bs, as_) = (b.add(s * 2 * TILE), a.add(s * 2 * TILE));
                for r in 0..16 {
                    let b0: __m512bh = std::mem::transmute(_mm512_load_si512(bs.add(r * 32) as *const __m512i));
                    let b1: __m512bh = std::mem::transmute(_mm512_load_si512(bs.add(TILE + r * 32) as *const __m512i));
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let m = rows * 8 + i;
                        // Row m is row m % 16 of half m / 16 of this step's panel; its pair r.
                        let pair = (as_.add(((m / 16) * 16 + m % 16) * 32 + 2 * r) as *const i32).read_unaligned();
                        let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                        acc[0] = _mm512_dpbf16_ps(acc[0], av, b0);
                        acc[1] = _mm512_dpbf16_ps(acc[1], av, b1);
                    }
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                let row = out.add((rows * 8 + i) * ld);
                _mm512_storeu_ps(row, acc[0]);
                _mm512_storeu_ps(row.add(16), acc[1]);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel_vectors(_: *const u16, _: *const u16, _: usize, _: *mut f32, _: usize) {
    unreachable!("bf16 products are only chosen on x86-64")
}

/// A pointer that tasks writing disjoint rows of one output may share.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: each task writes its own rows only.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// C [m, n] (row stride `ldc`) from A [m, k] and B [k, n] in bf16 with f32 accumulation, split into
/// 32-row panels over every core. `available()` must be true.
pub fn matmul(a: &Lhs, b: &PackedB, c: &mut [f32], ldc: usize, out: Out) {
    assert!(available(), "bf16 products called where no bf16 engine is available");
    assert!(a.m == 0 || c.len() >= (a.m - 1) * ldc + b.n, "output shape");
    let c = OutPtr(c.as_mut_ptr());
    let len = b.kb.max(1) * 2 * TILE;
    let count = group_size(len);
    (0..a.m.div_ceil(BLOCK * count)).into_par_iter().for_each(|g| {
        with_scratch(count * len, |panels, block| {
            // SAFETY: each group writes its own rows of C, which the assert above keeps inside `c`.
            unsafe { group(a, b, c, ldc, out, g * count, count, (panels, len), block) }
        })
    });
}

/// How many row panels of `len` bf16 values a task takes together: up to `GROUP`, as long as they
/// stay within about 1 MiB (half an L2); a weight's gradient, whose K is the step's token count,
/// has panels of hundreds of KiB.
fn group_size(len: usize) -> usize {
    ((1 << 20) / (2 * len)).clamp(1, GROUP)
}

/// Runs `f` with this thread's scratch: `panels` bf16 values (64-byte aligned) and a 32x32 f32
/// block, kept between calls (a training step runs hundreds of products, and fresh zeroed buffers
/// for each were a tenth of its time). `f` must not call back into products that use it.
fn with_scratch<R>(panels: usize, f: impl FnOnce(&mut [u16], &mut [f32]) -> R) -> R {
    thread_local! {
        static SCRATCH: std::cell::RefCell<(Aligned<u16>, Aligned<f32>)> =
            std::cell::RefCell::new((Aligned::zeroed(0), Aligned::zeroed(BLOCK * BLOCK)));
    }
    SCRATCH.with_borrow_mut(|(buf, block)| {
        if buf.len() < panels {
            *buf = Aligned::zeroed(panels);
        }
        f(&mut buf[..panels], block)
    })
}

/// The same product on the calling thread alone (attention's per-head products, each a task of
/// its own), into C at `c` with row stride `ldc`.
///
/// # Safety
/// `c` must address `a.m` rows of `b.n` floats at stride `ldc` that no other thread touches.
pub unsafe fn matmul_here(a: &Lhs, b: &PackedB, c: *mut f32, ldc: usize, out: Out) {
    let len = b.kb.max(1) * 2 * TILE;
    with_scratch(len, |panel, block| {
        for p in 0..a.m.div_ceil(BLOCK) {
            // SAFETY: forwarded from the caller.
            unsafe { group(a, b, OutPtr(c), ldc, out, p, 1, (panel, len), block) };
        }
    });
}

/// Row panels `first..first+count` of C (those that exist): A's panels converted once each, then
/// every 32-column block of B against all of them.
///
/// Compiled for AVX-512 (every AMX CPU has it), so the conversion of A and the writing of C run
/// 16 lanes wide.
///
/// # Safety
/// AMX must be available; `c` must address those rows (row stride `ldc`, `b.n` columns), owned by
/// the caller; `panels` must hold `count` panels of `len` >= `b.kb` steps of two tiles.
#[allow(clippy::too_many_arguments)]
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl,avx512dq"))]
unsafe fn group(
    a: &Lhs,
    b: &PackedB,
    c: OutPtr,
    ldc: usize,
    out: Out,
    first: usize,
    count: usize,
    (panels, len): (&mut [u16], usize),
    block: &mut [f32],
) {
    let count = (a.m.div_ceil(BLOCK) - first).min(count);
    for j in 0..count {
        convert_panel(a, (first + j) * BLOCK, b.k, &mut panels[j * len..][..len]);
    }
    configure();
    // SAFETY: forwarded from the caller; AMX is configured on this thread.
    unsafe { panels_times((panels, len), first, count, a.m, b, c, ldc, out, block) };
    release();
}

/// C's rows of `count` converted panels of A (the first is row panel `first`, of `m` rows in
/// all) times every block of B: each block of B, once loaded, serves every panel (a weight does
/// not stay in L2 beside the activations, so it is read once per group instead of once per panel).
///
/// # Safety
/// AMX configured on this thread; each panel holds `b.kb` steps; `c` addresses those rows of `b.n`
/// floats at stride `ldc`, owned by the caller.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn panels_times(
    (panels, len): (&[u16], usize),
    first: usize,
    count: usize,
    m: usize,
    b: &PackedB,
    c: OutPtr,
    ldc: usize,
    out: Out,
    block: &mut [f32],
) {
    for nb in 0..b.n.div_ceil(BLOCK) {
        let cols = (b.n - nb * BLOCK).min(BLOCK);
        for j in 0..count {
            let m0 = (first + j) * BLOCK;
            if b.kb > 0 {
                // SAFETY: the panel and the B block hold `kb` steps of two aligned tiles; block
                // holds 32x32 aligned floats.
                unsafe { kernel(panels[j * len..].as_ptr(), b.block(nb), b.kb, block.as_mut_ptr()) };
            } else {
                block.fill(0.0);
            }
            for r in 0..(m - m0).min(BLOCK) {
                // SAFETY: row m0 + r of C belongs to the caller; columns nb*32.. are inside n.
                let dst = unsafe { std::slice::from_raw_parts_mut(c.0.add((m0 + r) * ldc + nb * BLOCK), cols) };
                finish(&block[r * BLOCK..][..cols], dst, out, nb * BLOCK);
            }
        }
    }
}

/// One row of a block into C as `out` says; `col` is the row's first column (for the bias).
#[inline(always)]
fn finish(src: &[f32], dst: &mut [f32], out: Out, col: usize) {
    match out {
        Out::Store => dst.copy_from_slice(src),
        Out::Bias(bias) => {
            for ((d, s), b) in dst.iter_mut().zip(src).zip(&bias[col..]) {
                *d = s + b;
            }
        }
        Out::BiasAct(bias, act) => {
            for ((d, s), b) in dst.iter_mut().zip(src).zip(&bias[col..]) {
                *d = s + b;
            }
            apply(dst, act);
        }
        Out::Add => {
            for (d, s) in dst.iter_mut().zip(src) {
                *d += s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        // The same bf16 inputs, summed in f64: what AMX computes up to its f32 accumulation.
        let r = |x: f32| f32::from_bits((bf16(x) as u32) << 16) as f64;
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|kk| r(a[i * k + kk]) * r(b[kk * n + j])).sum::<f64>() as f32;
            }
        }
        c
    }

    #[test]
    fn rounding_to_bf16_is_to_nearest_even() {
        assert_eq!(bf16(1.0), 0x3f80);
        // 1 + 2^-8 lies halfway between two bf16 values: ties go to the even one (1.0).
        assert_eq!(bf16(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(bf16(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert!(f32::from_bits((bf16(f32::NAN) as u32) << 16).is_nan());
    }

    /// The AVX512-BF16 kernel on one 32x32 block of packed operands gives the bf16 reference (what
    /// the tiles give), whichever engine this process chose (`FLOW_BF16_ENGINE=avx512bf16 cargo
    /// test` runs every other bf16 test through it as well).
    #[test]
    fn the_vector_kernel_computes_the_tiles_product() {
        if !wide_vectors() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let mut rng = fastrand::Rng::with_seed(5);
        for &(m, k, n) in &[(32, 64, 32), (19, 45, 27)] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.f32() - 0.5).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.f32() - 0.5).collect();
            let want = reference(&a, &b, m, k, n);
            let packed = PackedB::from_rows(&b, k, n, n);
            let mut panel = Aligned::<u16>::zeroed(packed.kb * 2 * TILE);
            convert_panel(&Lhs::rows(&a, m, k), 0, k, &mut panel);
            let mut block = Aligned::<f32>::zeroed(BLOCK * BLOCK);
            // SAFETY: AVX512-BF16 is there; the panel and B's block hold kb steps; block is 32x32.
            unsafe { kernel_vectors(panel.as_ptr(), packed.block(0), packed.kb, block.as_mut_ptr(), BLOCK) };
            for i in 0..m {
                for j in 0..n {
                    let (g, w) = (block[i * BLOCK + j], want[i * n + j]);
                    assert!((g - w).abs() < 1e-4, "{m}x{k}x{n} [{i}, {j}]: {g} vs {w}");
                }
            }
        }
    }

    #[test]
    fn products_match_a_bf16_reference_at_odd_shapes() {
        if !available() {
            eprintln!("skipped: this CPU (or kernel) has no AMX bf16; the f32 path serves it");
            return;
        }
        let mut rng = fastrand::Rng::with_seed(3);
        for &(m, k, n) in &[(1, 32, 32), (45, 70, 33), (64, 384, 96), (7, 1, 5)] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.f32() - 0.5).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rng.f32() - 0.5).collect();
            let b: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
            let want = reference(&a, &b, m, k, n);
            let bias: Vec<f32> = (0..n).map(|j| j as f32).collect();
            for packed in
                [PackedB::from_weight(&w, n, k), PackedB::from_rows(&b, k, n, n), PackedB::from_strided(&w, k, n, 1, k)]
            {
                let mut c = vec![1.0f32; m * n];
                matmul(&Lhs::rows(&a, m, k), &packed, &mut c, n, Out::Add);
                for (g, w) in c.iter().zip(&want) {
                    assert!((g - (w + 1.0)).abs() < 1e-4, "{m}x{k}x{n}: {g} vs {}", w + 1.0);
                }
                matmul(&Lhs::rows(&a, m, k), &packed, &mut c, n, Out::Bias(&bias));
                for (i, (g, w)) in c.iter().zip(&want).enumerate() {
                    assert!((g - (w + bias[i % n])).abs() < 1e-4, "{m}x{k}x{n} with bias");
                }
            }
            // A read transposed: A^T stored [k, m].
            let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
            let mut c = vec![0f32; m * n];
            matmul(&Lhs { a: &at, m, rs: 1, cs: m }, &PackedB::from_rows(&b, k, n, n), &mut c, n, Out::Store);
            for (g, w) in c.iter().zip(&want) {
                assert!((g - w).abs() < 1e-4, "{m}x{k}x{n} transposed: {g} vs {w}");
            }
        }
    }
}
