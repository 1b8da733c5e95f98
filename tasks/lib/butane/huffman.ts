// ported from Go's compress/flate (BSD-3-Clause)
//
// The token and Huffman-code half of the gzip port in goflate.ts: token.go's length and
// offset codes, huffman_bit_writer.go's tables, huffman_code.go's encoder, exactly as Go
// computes them (the fixed encodings included).

const maxInt32 = 2147483647;

// --- token.go ---
export const lengthShift = 22;
export const offsetMask = (1 << lengthShift) - 1;
export const matchType = 1 << 30;

// --- huffman_bit_writer.go ---
export const maxNumLit = 286;
export const offsetCodeCount = 30;
export const endBlockMarker = 256;
export const lengthCodesStart = 257;
export const codegenCodeCount = 19;
export const badCode = 255;

export const lengthExtraBits = Int8Array.of(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0);
export const lengthBase = Uint32Array.of(
  0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 255,
);
export const offsetExtraBits = Int8Array.of(0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13);
export const offsetBase = Uint32Array.of(
  0x000000, 0x000001, 0x000002, 0x000003, 0x000004, 0x000006, 0x000008, 0x00000c, 0x000010, 0x000018, 0x000020,
  0x000030, 0x000040, 0x000060, 0x000080, 0x0000c0, 0x000100, 0x000180, 0x000200, 0x000300, 0x000400, 0x000600,
  0x000800, 0x000c00, 0x001000, 0x001800, 0x002000, 0x003000, 0x004000, 0x006000,
);
export const codegenOrder = Uint8Array.of(16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15);

// lengthCodes[length-3] and offsetCodes[offset-1 < 256], derived from the base tables as in token.go.
export const lengthCodes = new Uint8Array(256);
for (let c = 0; c < lengthBase.length; c++) {
  const base = lengthBase[c]!;
  const end = Math.min(256, base + (1 << lengthExtraBits[c]!));
  for (let x = base; x < end; x++) lengthCodes[x] = c;
}
export const offsetCodes = new Uint8Array(256);
for (let c = 0; c < 16; c++) {
  const base = offsetBase[c]!;
  for (let x = base; x < base + (1 << offsetExtraBits[c]!); x++) offsetCodes[x] = c;
}
export function offsetCode(off: number): number {
  if (off < 256) return offsetCodes[off]!;
  if (off >>> 7 < 256) return offsetCodes[off >>> 7]! + 14;
  return offsetCodes[off >>> 14]! + 28;
}

export function reverseBits(code: number, bitLength: number): number {
  let v = (code << (16 - bitLength)) & 0xffff;
  let r = 0;
  for (let i = 0; i < 16; i++) {
    r = (r << 1) | (v & 1);
    v >>>= 1;
  }
  return r;
}

// --- huffman_code.go ---
export interface HuffmanEncoder {
  code: Uint16Array;
  len: Uint8Array;
}

export function newHuffmanEncoder(size: number): HuffmanEncoder {
  return { code: new Uint16Array(size), len: new Uint8Array(size) };
}

export function bitLength(h: HuffmanEncoder, freq: Int32Array): number {
  let total = 0;
  for (let i = 0; i < freq.length; i++) {
    const f = freq[i]!;
    if (f !== 0) total += f * h.len[i]!;
  }
  return total;
}

// Shared scratch for generate/bitCounts: nodes are packed as freq*512+literal, which sorts
// exactly like Go's byFreq (freq, then literal); literal = key & 511.
export const nodeKeys = new Float64Array(maxNumLit + 1);
export const nodeFreqs = new Int32Array(maxNumLit + 1);
export const chunkLits = new Uint16Array(maxNumLit + 1);
export const bitCount = new Int32Array(17);
export const lvLastFreq = new Int32Array(17);
export const lvNextCharFreq = new Int32Array(17);
export const lvNextPairFreq = new Int32Array(17);
export const lvNeeded = new Int32Array(17);
export const leafCounts = new Int32Array(16 * 16);

// bitCounts fills bitCount[0..maxBits] and returns maxBits (as clamped).
export function bitCounts(n: number, maxBitsIn: number): number {
  let maxBits = maxBitsIn;
  nodeFreqs[n] = maxInt32;
  if (maxBits > n - 1) maxBits = n - 1;
  lvLastFreq.fill(0);
  lvNextCharFreq.fill(0);
  lvNextPairFreq.fill(0);
  lvNeeded.fill(0);
  leafCounts.fill(0);
  for (let level = 1; level <= maxBits; level++) {
    lvLastFreq[level] = nodeFreqs[1]!;
    lvNextCharFreq[level] = nodeFreqs[2]!;
    lvNextPairFreq[level] = nodeFreqs[0]! + nodeFreqs[1]!;
    leafCounts[level * 16 + level] = 2;
    if (level === 1) lvNextPairFreq[level] = maxInt32;
  }
  lvNeeded[maxBits] = 2 * n - 4;
  let level = maxBits;
  for (;;) {
    if (lvNextPairFreq[level] === maxInt32 && lvNextCharFreq[level] === maxInt32) {
      lvNeeded[level] = 0;
      lvNextPairFreq[level + 1] = maxInt32;
      level++;
      continue;
    }
    const prevFreq = lvLastFreq[level]!;
    if (lvNextCharFreq[level]! < lvNextPairFreq[level]!) {
      const k = leafCounts[level * 16 + level]! + 1;
      lvLastFreq[level] = lvNextCharFreq[level]!;
      leafCounts[level * 16 + level] = k;
      lvNextCharFreq[level] = nodeFreqs[k]!;
    } else {
      lvLastFreq[level] = lvNextPairFreq[level]!;
      leafCounts.copyWithin(level * 16, (level - 1) * 16, (level - 1) * 16 + level);
      lvNeeded[level - 1] = 2;
    }
    lvNeeded[level] = lvNeeded[level]! - 1;
    if (lvNeeded[level] === 0) {
      if (level === maxBits) break;
      lvNextPairFreq[level + 1] = prevFreq + lvLastFreq[level]!;
      level++;
    } else {
      while (lvNeeded[level - 1]! > 0) level--;
    }
  }
  if (leafCounts[maxBits * 16 + maxBits] !== n) throw new Error('goflate: leafCounts[maxBits][maxBits] != n');
  bitCount[0] = 0;
  let bits = 1;
  for (let lv = maxBits; lv > 0; lv--) {
    bitCount[bits] = leafCounts[maxBits * 16 + lv]! - leafCounts[maxBits * 16 + lv - 1]!;
    bits++;
  }
  return maxBits;
}

export function generate(h: HuffmanEncoder, freq: Int32Array, maxBits: number): void {
  let count = 0;
  for (let i = 0; i < freq.length; i++) {
    const f = freq[i]!;
    if (f !== 0) nodeKeys[count++] = f * 512 + i;
    else h.len[i] = 0;
  }
  if (count <= 2) {
    for (let i = 0; i < count; i++) {
      const lit = nodeKeys[i]! % 512;
      h.code[lit] = i;
      h.len[lit] = 1;
    }
    return;
  }
  const list = nodeKeys.subarray(0, count);
  list.sort();
  for (let i = 0; i < count; i++) nodeFreqs[i] = Math.floor(list[i]! / 512);
  const mb = bitCounts(count, maxBits);
  // assignEncodingAndSize
  let code = 0;
  let listLen = count;
  for (let n = 0; n <= mb; n++) {
    code = (code << 1) & 0xffff;
    const bits = n === 0 ? 0 : bitCount[n]!;
    if (bits === 0) continue;
    const start = listLen - bits;
    for (let j = 0; j < bits; j++) chunkLits[j] = list[start + j]! % 512;
    const chunk = chunkLits.subarray(0, bits);
    chunk.sort();
    for (let j = 0; j < bits; j++) {
      const lit = chunk[j]!;
      h.code[lit] = reverseBits(code, n);
      h.len[lit] = n;
      code++;
    }
    listLen = start;
  }
}

export const fixedLiteralEncoding = newHuffmanEncoder(maxNumLit);
for (let ch = 0; ch < maxNumLit; ch++) {
  let bits: number;
  let size: number;
  if (ch < 144) {
    bits = ch + 48;
    size = 8;
  } else if (ch < 256) {
    bits = ch + 400 - 144;
    size = 9;
  } else if (ch < 280) {
    bits = ch - 256;
    size = 7;
  } else {
    bits = ch + 192 - 280;
    size = 8;
  }
  fixedLiteralEncoding.code[ch] = reverseBits(bits, size);
  fixedLiteralEncoding.len[ch] = size;
}
export const fixedOffsetEncoding = newHuffmanEncoder(30);
for (let ch = 0; ch < 30; ch++) {
  fixedOffsetEncoding.code[ch] = reverseBits(ch, 5);
  fixedOffsetEncoding.len[ch] = 5;
}
