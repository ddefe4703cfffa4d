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

/// Rows (and columns) of one register block: 2x2 tiles of 16.
const BLOCK: usize = 32;
/// bf16 values in one tile (16 rows of 64 bytes).
const TILE: usize = 512;

/// Whether AMX bf16 products can run here: the CPU has AMX-TILE and AMX-BF16, the OS saves the tile
/// state (XCR0), and Linux granted this process the tile data (`arch_prctl(ARCH_REQ_XCOMP_PERM)`,
/// without which the first tile load is SIGILL). Decided once per process.
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| cpu_and_os() && request_permission())
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
        // Every AMX CPU has AVX512-BF16 too; the code around the tiles (conversion, the output's
        // bias and sums) is compiled for it, so it is required, not assumed.
        let wide = std::arch::is_x86_feature_detected!("avx512bf16")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512dq");
        if !(amx_bf16 && amx_tile && osxsave && wide) {
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

/// f32 to bf16, rounding to nearest even (a NaN stays a quiet NaN), as `vcvtne2ps2bf16` does.
#[inline(always)]
pub fn bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// A buffer aligned to 64 bytes: a tile row that straddles two cache lines costs AMX much of its
/// speed, and `Vec` memory is only 16-byte aligned.
pub struct Aligned<T: Copy + Default> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: the buffer is owned like a Vec's.
unsafe impl<T: Copy + Default + Send> Send for Aligned<T> {}
unsafe impl<T: Copy + Default + Sync> Sync for Aligned<T> {}

impl<T: Copy + Default> Aligned<T> {
    fn layout(len: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align((len * std::mem::size_of::<T>()).max(64), 64).expect("a valid layout")
    }

    pub fn zeroed(len: usize) -> Self {
        // SAFETY: the layout is non-zero sized; zero bytes are a valid f32 / u16.
        let ptr = unsafe { std::alloc::alloc_zeroed(Self::layout(len)) as *mut T };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(Self::layout(len));
        }
        Aligned { ptr, len }
    }
}

impl<T: Copy + Default> std::ops::Deref for Aligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: ptr addresses len initialised elements.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl<T: Copy + Default> std::ops::DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as above, and &mut self is unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl<T: Copy + Default> Drop for Aligned<T> {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { std::alloc::dealloc(self.ptr as *mut u8, Self::layout(self.len)) }
    }
}

/// A matrix B [k, n] as AMX's right-hand operand: 32-column blocks, each a run of K/32 steps of two
/// 16x16 VNNI tiles (row r of a tile holds the pairs B[2r][j], B[2r+1][j] for its 16 columns), zero
/// beyond k and n. Packed once for a weight, per step for an activation.
pub struct PackedB {
    pub k: usize,
    pub n: usize,
    kb: usize,
    data: Aligned<u16>,
}

impl PackedB {
    /// B = W^T for a Linear weight W [n, k] (PyTorch's [out, in]), so that y = x B = x W^T.
    pub fn from_weight(w: &[f32], n: usize, k: usize) -> PackedB {
        assert_eq!(w.len(), n * k, "weight shape");
        Self::pack(k, n, |kk, j| w[j * k + kk])
    }

    /// B read from row-major memory: B[kk][j] = b[kk * ld + j].
    pub fn from_rows(b: &[f32], k: usize, n: usize, ld: usize) -> PackedB {
        Self::from_strided(b, k, n, ld, 1)
    }

    /// B read through strides: B[kk][j] = b[kk * rs + j * cs] (cs = ld, rs = 1 reads a transpose).
    pub fn from_strided(b: &[f32], k: usize, n: usize, rs: usize, cs: usize) -> PackedB {
        assert!(k == 0 || n == 0 || b.len() > (k - 1) * rs + (n - 1) * cs, "matrix shape");
        if n * k < 1 << 16 && (cs == 1 || rs == 1) && available() {
            // SAFETY: the assert above keeps every read inside `b`; AMX (and AVX-512) is there.
            return unsafe { Self::pack_small(b, k, n, rs, cs) };
        }
        Self::pack(k, n, |kk, j| b[kk * rs + j * cs])
    }

    /// The packing of attention's operands (K^T and V of one head, a few thousand values, packed
    /// once per sequence and head, so as hot as the products): whole rows of 16 or 32 values at a
    /// time with no per-value closure, compiled for AVX-512 (this only runs where AMX does).
    ///
    /// # Safety
    /// Every B[kk][j] = b[kk * rs + j * cs] for kk < k, j < n must be inside `b`; AMX available.
    #[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl,avx512dq"))]
    unsafe fn pack_small(b: &[f32], k: usize, n: usize, rs: usize, cs: usize) -> PackedB {
        let (kb, nb) = (k.div_ceil(BLOCK), n.div_ceil(BLOCK));
        let mut data = Aligned::<u16>::zeroed(nb * kb * 2 * TILE);
        for blk in 0..nb {
            for s in 0..kb {
                for half in 0..2 {
                    let c0 = blk * BLOCK + half * 16;
                    if c0 >= n {
                        continue;
                    }
                    let cols = (n - c0).min(16);
                    let tile = &mut data[((blk * kb + s) * 2 + half) * TILE..][..TILE];
                    let rows = (k - s * BLOCK).min(BLOCK);
                    if cs == 1 {
                        // Row-major B (V): tile row r interleaves B rows 2r and 2r+1.
                        for e in 0..rows {
                            let src = &b[(s * BLOCK + e) * rs + c0..][..cols];
                            let (r, p) = (e / 2, e % 2);
                            for (j, v) in src.iter().enumerate() {
                                tile[r * 32 + 2 * j + p] = bf16(*v);
                            }
                        }
                    } else {
                        // B stored transposed (K^T): column j of B is a contiguous run of K's row j.
                        for j in 0..cols {
                            let src = &b[(c0 + j) * cs + s * BLOCK..][..rows];
                            for (e, v) in src.iter().enumerate() {
                                tile[(e / 2) * 32 + 2 * j + e % 2] = bf16(*v);
                            }
                        }
                    }
                }
            }
        }
        PackedB { k, n, kb, data }
    }

    fn pack(k: usize, n: usize, get: impl Fn(usize, usize) -> f32 + Sync) -> PackedB {
        let (kb, nb) = (k.div_ceil(BLOCK), n.div_ceil(BLOCK));
        let mut data = Aligned::<u16>::zeroed(nb * kb * 2 * TILE);
        let pack_block = |(b, block): (usize, &mut [u16])| {
            for s in 0..kb {
                for half in 0..2 {
                    let tile = &mut block[(s * 2 + half) * TILE..][..TILE];
                    for r in 0..16 {
                        for j in 0..16 {
                            let col = b * BLOCK + half * 16 + j;
                            for p in 0..2 {
                                let row = s * BLOCK + 2 * r + p;
                                if row < k && col < n {
                                    tile[r * 32 + 2 * j + p] = bf16(get(row, col));
                                }
                            }
                        }
                    }
                }
            }
        };
        // A weight is packed over every core; attention's small operands inside one task.
        if n * k >= 1 << 16 {
            data.par_chunks_mut(kb * 2 * TILE).enumerate().for_each(pack_block);
        } else {
            data.chunks_mut(kb * 2 * TILE).enumerate().for_each(pack_block);
        }
        PackedB { k, n, kb, data }
    }

    fn block(&self, b: usize) -> *const u16 {
        self.data[b * self.kb * 2 * TILE..].as_ptr()
    }
}

/// The left operand A [m, k], read as `a[i * rs + kk * cs]` (so a transposed matrix needs no copy).
#[derive(Clone, Copy)]
pub struct Lhs<'a> {
    pub a: &'a [f32],
    pub m: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Lhs<'a> {
    /// A row-major [m, k] matrix with row stride `ld`.
    pub fn rows(a: &'a [f32], m: usize, ld: usize) -> Self {
        Lhs { a, m, rs: ld, cs: 1 }
    }
}

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
            o1 = in(reg) out.add(16 * 32),
            ld = in(reg) 128usize,
            out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
            out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
            options(nostack),
        );
    }
}

/// Rows `m0..m0+32` of A as one bf16 panel ([K/32][2 halves of 16 rows][16x32]), zero beyond m and k.
#[inline(always)]
fn convert_panel(a: &Lhs, m0: usize, k: usize, panel: &mut [u16]) {
    let steps = k.div_ceil(BLOCK);
    if a.rs == 1 && a.cs != 1 {
        return convert_panel_transposed(a, m0, k, panel);
    }
    for i in 0..BLOCK {
        let row = m0 + i;
        let (half, r) = (i / 16, i % 16);
        for s in 0..steps {
            let dst = &mut panel[((s * 2 + half) * 16 + r) * 32..][..32];
            if row >= a.m {
                dst.fill(0);
                continue;
            }
            let k0 = s * BLOCK;
            let width = (k - k0).min(BLOCK);
            if a.cs == 1 && width == BLOCK {
                // SAFETY: this runs inside `one_panel`, which only runs where `available()` found
                // AVX512-BF16.
                unsafe { convert32(&a.a[row * a.rs + k0..][..BLOCK], dst) };
            } else {
                for (e, d) in dst.iter_mut().enumerate() {
                    *d = if e < width { bf16(a.a[row * a.rs + (k0 + e) * a.cs]) } else { 0 };
                }
            }
        }
    }
}

/// The panel of an A stored transposed (A[i][kk] = a[i + kk * cs], e.g. dY^T for a weight's
/// gradient): read 32 consecutive rows of each stored line, so the reads stay sequential.
fn convert_panel_transposed(a: &Lhs, m0: usize, k: usize, panel: &mut [u16]) {
    panel[..k.div_ceil(BLOCK) * 2 * TILE].fill(0);
    let rows = a.m.saturating_sub(m0).min(BLOCK);
    for kk in 0..k {
        let line = &a.a[m0 + kk * a.cs..][..rows];
        let (s, e) = (kk / BLOCK, kk % BLOCK);
        for (i, v) in line.iter().enumerate() {
            panel[((s * 2 + i / 16) * 16 + i % 16) * 32 + e] = bf16(*v);
        }
    }
}

/// 32 consecutive floats to bf16 with one `vcvtne2ps2bf16`.
///
/// # Safety
/// The CPU must have AVX512-BF16 (every AMX CPU has it; `available()` checks).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
#[inline]
unsafe fn convert32(src: &[f32], dst: &mut [u16]) {
    use std::arch::x86_64::*;
    assert!(src.len() >= 32 && dst.len() >= 32);
    // SAFETY: 32 floats are read and 32 bf16 written, unaligned accesses.
    unsafe {
        let lo = _mm512_loadu_ps(src.as_ptr());
        let hi = _mm512_loadu_ps(src.as_ptr().add(16));
        // Lanes 0..16 of the result come from the second argument.
        let v = _mm512_cvtne2ps_pbh(hi, lo);
        _mm512_storeu_si512(dst.as_mut_ptr() as *mut __m512i, std::mem::transmute::<__m512bh, __m512i>(v));
    }
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
    assert!(available(), "AMX products called where AMX is not available");
    assert!(a.m == 0 || c.len() >= (a.m - 1) * ldc + b.n, "output shape");
    let c = OutPtr(c.as_mut_ptr());
    let steps = b.kb;
    (0..a.m.div_ceil(BLOCK)).into_par_iter().for_each_init(
        || (Aligned::<u16>::zeroed(steps.max(1) * 2 * TILE), Aligned::<f32>::zeroed(BLOCK * BLOCK)),
        // SAFETY: each panel writes its own 32 rows of C, which the assert above keeps inside `c`.
        |(panel, block), p| unsafe { one_panel(a, b, c, ldc, out, p, panel, block) },
    );
}

/// The same product on the calling thread alone (attention's per-head products, each a task of
/// its own), into C at `c` with row stride `ldc`.
///
/// # Safety
/// `c` must address `a.m` rows of `b.n` floats at stride `ldc` that no other thread touches.
pub unsafe fn matmul_here(a: &Lhs, b: &PackedB, c: *mut f32, ldc: usize, out: Out) {
    thread_local! {
        static BUFS: std::cell::RefCell<(Aligned<u16>, Aligned<f32>)> =
            std::cell::RefCell::new((Aligned::zeroed(0), Aligned::zeroed(BLOCK * BLOCK)));
    }
    BUFS.with_borrow_mut(|(panel, block)| {
        if panel.len() < b.kb.max(1) * 2 * TILE {
            *panel = Aligned::zeroed(b.kb.max(1) * 2 * TILE);
        }
        for p in 0..a.m.div_ceil(BLOCK) {
            // SAFETY: forwarded from the caller.
            unsafe { one_panel(a, b, OutPtr(c), ldc, out, p, panel, block) };
        }
    });
}

/// Rows p*32.. of C: A's panel converted once, then every 32-column block of B.
///
/// Compiled for AVX-512 (every AMX CPU has it), so the conversion of A and the writing of C run
/// 16 lanes wide.
///
/// # Safety
/// AMX must be available; `c` must address those rows (row stride `ldc`, `b.n` columns), owned by
/// the caller; `panel` must hold `b.kb` steps of two tiles.
#[allow(clippy::too_many_arguments)]
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl,avx512dq"))]
unsafe fn one_panel(
    a: &Lhs,
    b: &PackedB,
    c: OutPtr,
    ldc: usize,
    out: Out,
    p: usize,
    panel: &mut [u16],
    block: &mut [f32],
) {
    let (m, n, k, steps) = (a.m, b.n, b.k, b.kb);
    let m0 = p * BLOCK;
    convert_panel(a, m0, k, panel);
    configure();
    for nb in 0..n.div_ceil(BLOCK) {
        if steps > 0 {
            // SAFETY: AMX is configured on this thread; panel and the B block hold `steps` steps of
            // two aligned tiles; block holds 32x32 aligned floats.
            unsafe { kernel(panel.as_ptr(), b.block(nb), steps, block.as_mut_ptr()) };
        } else {
            block.fill(0.0);
        }
        let (rows, cols) = ((m - m0).min(BLOCK), (n - nb * BLOCK).min(BLOCK));
        for r in 0..rows {
            let src = &block[r * BLOCK..][..cols];
            // SAFETY: row m0 + r of C belongs to the caller; columns nb*32.. are inside n.
            let dst = unsafe { std::slice::from_raw_parts_mut(c.0.add((m0 + r) * ldc + nb * BLOCK), cols) };
            match out {
                Out::Store => dst.copy_from_slice(src),
                Out::Bias(bias) => {
                    for ((d, s), b) in dst.iter_mut().zip(src).zip(&bias[nb * BLOCK..]) {
                        *d = s + b;
                    }
                }
                Out::BiasAct(bias, act) => {
                    for ((d, s), b) in dst.iter_mut().zip(src).zip(&bias[nb * BLOCK..]) {
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
    }
    release();
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
