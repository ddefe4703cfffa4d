//! The operands of the bf16 products: B packed into AMX's VNNI tile layout (once for a weight),
//! A converted to bf16 one 32-row panel at a time, and the 64-byte-aligned buffers both live in.

use rayon::prelude::*;

use super::{BLOCK, TILE, available};

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
    pub(super) kb: usize,
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

    pub(super) fn block(&self, b: usize) -> *const u16 {
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

/// Rows `m0..m0+32` of A as one bf16 panel ([K/32][2 halves of 16 rows][16x32]), zero beyond m and k.
#[inline(always)]
pub(super) fn convert_panel(a: &Lhs, m0: usize, k: usize, panel: &mut [u16]) {
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
pub(super) unsafe fn convert32(src: &[f32], dst: &mut [u16]) {
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
pub(super) unsafe fn convert32_scaled(src: &[f32], scale: f32, dst: &mut [u16]) {
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
