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

use super::kernels::{apply, softmax_exp};
use super::mpnet::HeadBias;

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
        Self::from_strided(w, k, n, 1, k)
    }

    /// B read from row-major memory: B[kk][j] = b[kk * ld + j].
    pub fn from_rows(b: &[f32], k: usize, n: usize, ld: usize) -> PackedB {
        Self::from_strided(b, k, n, ld, 1)
    }

    /// B read through strides: B[kk][j] = b[kk * rs + j * cs] (cs = ld, rs = 1 reads a transpose).
    pub fn from_strided(b: &[f32], k: usize, n: usize, rs: usize, cs: usize) -> PackedB {
        assert!(k == 0 || n == 0 || b.len() > (k - 1) * rs + (n - 1) * cs, "matrix shape");
        if !((cs == 1 || rs == 1) && available()) {
            return Self::pack(k, n, |kk, j| b[kk * rs + j * cs]);
        }
        let kb = k.div_ceil(BLOCK);
        let mut data = Aligned::<u16>::zeroed(n.div_ceil(BLOCK) * kb * 2 * TILE);
        // SAFETY: the assert above keeps every read inside `b`; AMX (and AVX-512) is there.
        let pack = |(blk, block): (usize, &mut [u16])| unsafe { Self::pack_block(b, k, n, rs, cs, blk, block) };
        // A weight or a training step's activations over every core; attention's small operands
        // (packed inside a task of their own) on the calling thread.
        if n * k >= 1 << 16 {
            data.par_chunks_mut(kb * 2 * TILE).enumerate().for_each(pack);
        } else {
            data.chunks_mut(kb * 2 * TILE).enumerate().for_each(pack);
        }
        PackedB { k, n, kb, data }
    }

    /// One 32-column block of B (`block`, zeroed), 16 lanes at a time: a row-major B interleaves
    /// two rows per tile row with one permute; a transposed B (a weight's W^T, attention's K^T)
    /// converts each column's 32 values at once, which gives a tile's column, and the tile is read
    /// back across. The packing is as hot as the products for attention's operands (packed once
    /// per sequence and head) and for a training step's activations.
    ///
    /// # Safety
    /// Every B[kk][j] = b[kk * rs + j * cs] for kk < k, j < n must be inside `b`; AMX available;
    /// `block` holds K/32 steps of two tiles.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl,avx512dq")]
    unsafe fn pack_block(b: &[f32], k: usize, n: usize, rs: usize, cs: usize, blk: usize, block: &mut [u16]) {
        use std::arch::x86_64::*;
        let kb = k.div_ceil(BLOCK);
        let mask = |len: usize| if len >= 16 { 0xffff } else { (1u16 << len) - 1 };
        // Lane 2j of a tile row takes lane j (row 2r), lane 2j+1 lane 16+j (row 2r+1).
        let pairs: [u16; 32] = std::array::from_fn(|i| (i / 2 + 16 * (i % 2)) as u16);
        let across: [i32; 16] = std::array::from_fn(|j| 16 * j as i32);
        // SAFETY: every load is masked to the columns and rows that exist (so inside `b`, as the
        // caller promised); every store writes one 64-byte tile row inside `block`.
        unsafe {
            let pairs = _mm512_loadu_si512(pairs.as_ptr() as *const __m512i);
            let across = _mm512_loadu_si512(across.as_ptr() as *const __m512i);
            let mut columns = [0u32; 256];
            for s in 0..kb {
                for half in 0..2 {
                    let c0 = blk * BLOCK + half * 16;
                    if c0 >= n {
                        continue;
                    }
                    let cols = (n - c0).min(16);
                    let tile = block[(s * 2 + half) * TILE..].as_mut_ptr();
                    let rows = (k - s * BLOCK).min(BLOCK);
                    if cs == 1 {
                        for r in 0..rows.div_ceil(2) {
                            let e = s * BLOCK + 2 * r;
                            let lo = _mm512_maskz_loadu_ps(mask(cols), b.as_ptr().add(e * rs + c0));
                            let hi = if 2 * r + 1 < rows {
                                _mm512_maskz_loadu_ps(mask(cols), b.as_ptr().add((e + 1) * rs + c0))
                            } else {
                                _mm512_setzero_ps()
                            };
                            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                            _mm512_storeu_si512(tile.add(r * 32) as *mut __m512i, _mm512_permutexvar_epi16(pairs, v));
                        }
                    } else {
                        // Columns past n are zero in the tile, as in every packing here.
                        columns[16 * cols..].fill(0);
                        for j in 0..cols {
                            let src = b.as_ptr().add((c0 + j) * cs + s * BLOCK);
                            let lo = _mm512_maskz_loadu_ps(mask(rows), src);
                            let hi = _mm512_maskz_loadu_ps(mask(rows.saturating_sub(16)), src.add(16));
                            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                            _mm512_storeu_si512(columns.as_mut_ptr().add(16 * j) as *mut __m512i, v);
                        }
                        for r in 0..rows.div_ceil(2) {
                            let row = _mm512_i32gather_epi32::<4>(across, columns.as_ptr().add(r) as *const i32);
                            _mm512_storeu_si512(tile.add(r * 32) as *mut __m512i, row);
                        }
                    }
                }
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn pack_block(_: &[f32], _: usize, _: usize, _: usize, _: usize, _: usize, _: &mut [u16]) {
        unreachable!("AMX is x86-64 only")
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
    unsafe { kernel_ld(a, b, steps, out, BLOCK) }
}

/// `kernel` with C's rows `ld` floats apart (`out` must then hold 32 such rows, 64-byte aligned).
#[inline(always)]
unsafe fn kernel_ld(a: *const u16, b: *const u16, steps: usize, out: *mut f32, ld: usize) {
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

/// Rows `m0..m0+32` of A as one bf16 panel ([K/32][2 halves of 16 rows][16x32]), zero beyond m and k.
#[inline(always)]
fn convert_panel(a: &Lhs, m0: usize, k: usize, panel: &mut [u16]) {
    let steps = k.div_ceil(BLOCK);
    if a.rs == 1 && a.cs != 1 {
        // SAFETY: this runs inside `group`, which only runs where `available()` found AVX-512
        // and AVX512-BF16; `a` holds its m rows by the caller's contract.
        return unsafe { convert_panel_transposed(a, m0, k, panel) };
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
                // SAFETY: this runs inside `group`, which only runs where `available()` found
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
/// gradient): each panel row's 32 values of a step are gathered 16 at a time; consecutive rows
/// read neighbouring floats of the same cache lines.
///
/// # Safety
/// AVX-512 and AVX512-BF16 (every AMX CPU has them); `a` must hold every A[i][kk] for i < a.m.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl,avx512dq")]
unsafe fn convert_panel_transposed(a: &Lhs, m0: usize, k: usize, panel: &mut [u16]) {
    use std::arch::x86_64::*;
    let rows = a.m.saturating_sub(m0).min(BLOCK);
    let idx: [i32; 16] = std::array::from_fn(|e| (e * a.cs) as i32);
    assert!(k <= 1 || (k - 1) * a.cs < i32::MAX as usize, "a transposed operand too large to gather");
    // SAFETY: each gather reads A[m0 + i][kk] for i < rows and kk < k only (masked by width);
    // each store writes one 32-value row of the panel.
    unsafe {
        let idx = _mm512_loadu_si512(idx.as_ptr() as *const __m512i);
        for s in 0..k.div_ceil(BLOCK) {
            let width = (k - s * BLOCK).min(BLOCK);
            let mask = |len: usize| if len >= 16 { 0xffffu16 } else { (1u16 << len) - 1 };
            let (m_lo, m_hi) = (mask(width), mask(width.saturating_sub(16)));
            for i in 0..BLOCK {
                let dst = panel[((s * 2 + i / 16) * 16 + i % 16) * BLOCK..].as_mut_ptr();
                if i >= rows {
                    _mm512_storeu_si512(dst as *mut __m512i, _mm512_setzero_si512());
                    continue;
                }
                let base = a.a.as_ptr().add(m0 + i + s * BLOCK * a.cs);
                let lo = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), m_lo, idx, base);
                let hi = if m_hi != 0 {
                    _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), m_hi, idx, base.add(16 * a.cs))
                } else {
                    _mm512_setzero_ps()
                };
                let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(dst as *mut __m512i, v);
            }
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
    // SAFETY: forwarded.
    unsafe { convert32_scaled(src, 1.0, dst) }
}

/// `scale` times 32 consecutive floats, to bf16.
///
/// # Safety
/// As `convert32`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
#[inline]
unsafe fn convert32_scaled(src: &[f32], scale: f32, dst: &mut [u16]) {
    use std::arch::x86_64::*;
    assert!(src.len() >= 32 && dst.len() >= 32);
    // SAFETY: 32 floats are read and 32 bf16 written, unaligned accesses.
    unsafe {
        let s = _mm512_set1_ps(scale);
        let lo = _mm512_mul_ps(_mm512_loadu_ps(src.as_ptr()), s);
        let hi = _mm512_mul_ps(_mm512_loadu_ps(src.as_ptr().add(16)), s);
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

/// One (sequence, head) of attention, ctx = softmax(scale Q K^T) V, 32 query rows at a time: the
/// rows' scores (32 x n) are made, exponentiated and converted into the second product's bf16
/// operand while they are in cache, softmax's division applied in that conversion, so the n x n
/// probabilities never reach memory. For inference; training keeps the probabilities and takes the
/// two products one by one. `kt` is K^T [dh, n], `v` is V [n, dh]; `bias` (MPNet's, by relative
/// position) is added to the scaled scores.
///
/// # Safety
/// `ctx` must address `q.m` rows of `v.n` floats at stride `ldc` that no other thread touches;
/// `available()` must be true; q.m == kt.n == v.k.
pub(crate) unsafe fn attention_head(
    q: &Lhs,
    kt: &PackedB,
    v: &PackedB,
    scale: f32,
    bias: Option<HeadBias>,
    ctx: *mut f32,
    ldc: usize,
) {
    thread_local! {
        static BUFS: std::cell::RefCell<[Aligned<u16>; 2]> =
            std::cell::RefCell::new([Aligned::zeroed(0), Aligned::zeroed(0)]);
        static ROWS: std::cell::RefCell<(Aligned<f32>, Aligned<f32>)> =
            std::cell::RefCell::new((Aligned::zeroed(0), Aligned::zeroed(BLOCK * BLOCK)));
    }
    BUFS.with_borrow_mut(|[p_in, p_mid]| {
        ROWS.with_borrow_mut(|(scores, block)| {
            let grow = |buf: &mut Aligned<u16>, steps: usize| {
                if buf.len() < steps.max(1) * 2 * TILE {
                    *buf = Aligned::zeroed(steps.max(1) * 2 * TILE);
                }
            };
            grow(p_in, kt.kb);
            grow(p_mid, v.kb);
            if scores.len() < BLOCK * v.kb * BLOCK {
                *scores = Aligned::zeroed(BLOCK * v.kb * BLOCK);
            }
            for p in 0..q.m.div_ceil(BLOCK) {
                // SAFETY: forwarded from the caller; the buffers were sized above.
                unsafe { attention_panel(q, kt, v, (scale, bias), ctx, ldc, p, [p_in, p_mid], scores, block) };
            }
        })
    });
}

/// Rows p*32.. of `attention_head`.
///
/// # Safety
/// As `attention_head`; `p_in` holds kt.kb steps, `p_mid` v.kb steps, `scores` 32 x v.kb*32 floats.
#[allow(clippy::too_many_arguments)]
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl,avx512dq"))]
unsafe fn attention_panel(
    q: &Lhs,
    kt: &PackedB,
    v: &PackedB,
    (scale, bias): (f32, Option<HeadBias>),
    ctx: *mut f32,
    ldc: usize,
    p: usize,
    [p_in, p_mid]: [&mut [u16]; 2],
    scores: &mut [f32],
    block: &mut [f32],
) {
    let (m0, n, width) = (p * BLOCK, kt.n, v.kb * BLOCK);
    convert_panel(q, m0, kt.k, p_in);
    configure();
    for nb in 0..n.div_ceil(BLOCK) {
        // SAFETY: AMX configured; p_in and the K^T block hold `kb` steps; scores holds 32 rows of
        // `width` floats, 64-byte aligned (width is a multiple of 32).
        unsafe { kernel_ld(p_in.as_ptr(), kt.block(nb), kt.kb, scores[nb * BLOCK..].as_mut_ptr(), width) };
    }
    for i in 0..BLOCK {
        let row = &mut scores[i * width..][..n];
        let inv = match bias {
            Some(b) if m0 + i < n => {
                b.add_scaled(row, m0 + i, scale);
                softmax_exp(row, 1.0)
            }
            _ => softmax_exp(row, scale),
        };
        for s in 0..v.kb {
            let dst = &mut p_mid[((s * 2 + i / 16) * 16 + i % 16) * BLOCK..][..BLOCK];
            let chunk = &row[s * BLOCK..(s * BLOCK + BLOCK).min(n)];
            if chunk.len() == BLOCK {
                // SAFETY: AVX512-BF16 is there (this only runs where AMX does).
                unsafe { convert32_scaled(chunk, inv, dst) };
            } else {
                // The last keys of a sequence whose length is not a multiple of 32; zero beyond.
                for (e, d) in dst.iter_mut().enumerate() {
                    *d = chunk.get(e).map_or(0, |x| bf16(x * inv));
                }
            }
        }
    }
    // SAFETY: the caller owns these rows of ctx; AMX is configured.
    unsafe { panels_times((p_mid, p_mid.len()), p, 1, q.m, v, OutPtr(ctx), ldc, Out::Store, block) };
    release();
}

/// A feed-forward block, C = act(A U + u) D + d, one 32-row panel at a time: the intermediate
/// panel (32 x U's width) goes from the first product's output, through bias and activation,
/// straight into the bf16 operand of the second, and never to memory; that matrix (four times the
/// hidden width) is the largest an encoder pass writes and reads. `available()` must be true.
pub fn mlp(a: &Lhs, up: (&PackedB, &[f32]), act: HiddenAct, down: (&PackedB, &[f32]), c: &mut [f32], ldc: usize) {
    assert!(available(), "AMX products called where AMX is not available");
    assert_eq!(up.0.n, down.0.k, "the intermediate width");
    assert!(a.m == 0 || c.len() >= (a.m - 1) * ldc + down.0.n, "output shape");
    let c = OutPtr(c.as_mut_ptr());
    let (in_len, mid_len) = (up.0.kb.max(1) * 2 * TILE, down.0.kb.max(1) * 2 * TILE);
    (0..a.m.div_ceil(BLOCK * GROUP)).into_par_iter().for_each(|g| {
        with_scratch(GROUP * (in_len + mid_len), |panels, block| {
            let (p_in, p_mid) = panels.split_at_mut(GROUP * in_len);
            // SAFETY: each group writes its own rows of C, which the assert above keeps inside `c`.
            unsafe { mlp_group(a, up, act, down, c, ldc, g, (p_in, in_len), (p_mid, mid_len), block) }
        })
    });
}

/// Rows g*GROUP*32.. of `mlp`'s output.
///
/// # Safety
/// As `group`, with `p_in` holding GROUP panels of `up.kb` steps and `p_mid` of `down.kb` steps.
#[allow(clippy::too_many_arguments)]
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl,avx512dq"))]
unsafe fn mlp_group(
    a: &Lhs,
    (up, up_bias): (&PackedB, &[f32]),
    act: HiddenAct,
    (down, down_bias): (&PackedB, &[f32]),
    c: OutPtr,
    ldc: usize,
    g: usize,
    (p_in, in_len): (&mut [u16], usize),
    (p_mid, mid_len): (&mut [u16], usize),
    block: &mut [f32],
) {
    let first = g * GROUP;
    let count = (a.m.div_ceil(BLOCK) - first).min(GROUP);
    for j in 0..count {
        convert_panel(a, (first + j) * BLOCK, up.k, &mut p_in[j * in_len..][..in_len]);
    }
    configure();
    for nb in 0..up.n.div_ceil(BLOCK) {
        let cols = (up.n - nb * BLOCK).min(BLOCK);
        for j in 0..count {
            // SAFETY: AMX configured; the panel and the B block hold `kb` steps; block is 32x32.
            unsafe { kernel(p_in[j * in_len..].as_ptr(), up.block(nb), up.kb, block.as_mut_ptr()) };
            // Block nb of the intermediate is step nb of the second product's panel: row i goes
            // to half i/16, row i%16, zero past the intermediate width (so it adds nothing).
            for i in 0..BLOCK {
                let row = &mut block[i * BLOCK..][..BLOCK];
                for (v, b) in row[..cols].iter_mut().zip(&up_bias[nb * BLOCK..]) {
                    *v += b;
                }
                apply(&mut row[..cols], act);
                row[cols..].fill(0.0);
                let dst = &mut p_mid[j * mid_len + ((nb * 2 + i / 16) * 16 + i % 16) * BLOCK..][..BLOCK];
                // SAFETY: AVX512-BF16 is there (this function is only called where AMX is).
                unsafe { convert32(row, dst) };
            }
        }
    }
    // SAFETY: as above; the caller owns these rows of C.
    unsafe { panels_times((p_mid, mid_len), first, count, a.m, down, c, ldc, Out::Bias(down_bias), block) };
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
