// ported from Go's compress/flate and compress/gzip (BSD-3-Clause)
//
// A byte-exact port of what Go (1.19 and the releases sharing its flate code) writes for
// gzip.NewWriterLevel(w, gzip.BestCompression) + one Write + Close: the output Butane
// embeds in `compression: gzip` data URLs. Only level 9 of the deflate compressor is kept
// (fastSkipHashing == skipNever, so the lazy-matching branches are folded in).
import { crc32 } from 'node:zlib';

import {
  lengthShift,
  offsetMask,
  matchType,
  maxNumLit,
  offsetCodeCount,
  endBlockMarker,
  lengthCodesStart,
  codegenCodeCount,
  badCode,
  lengthExtraBits,
  lengthBase,
  offsetExtraBits,
  offsetBase,
  codegenOrder,
  lengthCodes,
  offsetCode,
  type HuffmanEncoder,
  newHuffmanEncoder,
  bitLength,
  generate,
  fixedLiteralEncoding,
  fixedOffsetEncoding,
} from './huffman.ts';

// --- deflate.go constants (level 9) ---
const windowSize = 1 << 15;
const windowMask = windowSize - 1;
const minMatchLength = 4;
const maxMatchLength = 258;
const baseMatchLength = 3;
const baseMatchOffset = 1;
const maxFlateBlockTokens = 1 << 14;
const maxStoreBlockSize = 65535;
const hashBits = 17;
const hashSize = 1 << hashBits;
const hashMask = hashSize - 1;
const maxHashOffset = 1 << 24;
const maxInt32 = 2147483647;
const levelGood = 32;
const levelLazy = 258;
const levelNice = 258;
const levelChain = 4096;
const hashmul = 0x1e35a7bd;

// findMatch, returning length<<16 | offset, or -1 when no match qualifies.
function findMatchFn(
  win: Uint8Array,
  hashPrev: Int32Array,
  hashOffset: number,
  pos: number,
  prevHead: number,
  prevLength: number,
  lookahead: number,
): number {
  const minMatchLook = lookahead < maxMatchLength ? lookahead : maxMatchLength;
  const nice = minMatchLook < levelNice ? minMatchLook : levelNice;
  let tries = levelChain;
  let length = prevLength;
  if (length >= levelGood) tries >>= 2;
  let wEnd = win[pos + length]!;
  const minIndex = pos - windowSize;
  const lo = minIndex < 0 ? 0 : minIndex;
  let result = -1;
  let i = prevHead;
  for (;;) {
    if (win[i + length] === wEnd) {
      let n = 0;
      while (n < minMatchLook && win[i + n] === win[pos + n]) n++;
      if (n > length && (n > minMatchLength || pos - i <= 4096)) {
        length = n;
        result = (n << 16) | (pos - i);
        if (n >= nice) break;
        wEnd = win[pos + n]!;
      }
    }
    if (i === minIndex || --tries === 0) break;
    i = hashPrev[i & windowMask]! - hashOffset;
    if (i < lo) break;
  }
  return result;
}

// --- compressor + huffmanBitWriter state, one per call ---
class Deflater {
  // bit writer (the byte stream is what matters; Go's 48-bit buffering does not change it)
  out: Uint8Array;
  outPos = 0;
  bits = 0;
  nbits = 0;
  literalFreq = new Int32Array(maxNumLit);
  offsetFreq = new Int32Array(offsetCodeCount);
  codegenFreq = new Int32Array(codegenCodeCount);
  codegen = new Uint8Array(maxNumLit + offsetCodeCount + 1);
  literalEncoding = newHuffmanEncoder(maxNumLit);
  offsetEncoding = newHuffmanEncoder(offsetCodeCount);
  codegenEncoding = newHuffmanEncoder(codegenCodeCount);

  // compressor
  sync = false;
  chainHead = -1;
  hashHead = new Int32Array(hashSize);
  hashPrev = new Int32Array(windowSize);
  hashOffset = 1;
  index = 0;
  window = new Uint8Array(2 * windowSize);
  windowEnd = 0;
  blockStart = 0;
  byteAvailable = false;
  tokens = new Int32Array(maxFlateBlockTokens + 1);
  ntokens = 0;
  length = minMatchLength - 1;
  offset = 0;
  maxInsertIndex = 0;
  // findMatch results
  fmLength = 0;
  fmOffset = 0;

  constructor(capacity: number) {
    this.out = new Uint8Array(capacity);
  }

  ensure(extra: number): void {
    if (this.outPos + extra <= this.out.length) return;
    const next = new Uint8Array(Math.max(this.out.length * 2, this.outPos + extra));
    next.set(this.out.subarray(0, this.outPos));
    this.out = next;
  }

  writeBits(b: number, nb: number): void {
    this.bits |= b << this.nbits;
    this.nbits += nb;
    while (this.nbits >= 8) {
      this.out[this.outPos++] = this.bits & 0xff;
      this.bits >>>= 8;
      this.nbits -= 8;
    }
  }

  // flush: pad to a byte boundary.
  flush(): void {
    if (this.nbits > 0) this.out[this.outPos++] = this.bits & 0xff;
    this.bits = 0;
    this.nbits = 0;
  }

  writeStoredHeader(length: number, isEof: boolean): void {
    this.writeBits(isEof ? 1 : 0, 3);
    this.flush();
    this.writeBits(length, 16);
    this.writeBits(~length & 0xffff, 16);
  }

  writeBytes(start: number, end: number): void {
    if (this.nbits & 7) throw new Error('goflate: writeBytes with unfinished bits');
    this.out.set(this.window.subarray(start, end), this.outPos);
    this.outPos += end - start;
  }

  generateCodegen(numLiterals: number, numOffsets: number, litEnc: HuffmanEncoder, offEnc: HuffmanEncoder): void {
    const freq = this.codegenFreq;
    freq.fill(0);
    const codegen = this.codegen;
    for (let i = 0; i < numLiterals; i++) codegen[i] = litEnc.len[i]!;
    for (let i = 0; i < numOffsets; i++) codegen[numLiterals + i] = offEnc.len[i]!;
    codegen[numLiterals + numOffsets] = badCode;

    let size = codegen[0]!;
    let count = 1;
    let outIndex = 0;
    for (let inIndex = 1; size !== badCode; inIndex++) {
      const nextSize = codegen[inIndex]!;
      if (nextSize === size) {
        count++;
        continue;
      }
      if (size !== 0) {
        codegen[outIndex++] = size;
        freq[size]!++;
        count--;
        while (count >= 3) {
          const n = count < 6 ? count : 6;
          codegen[outIndex++] = 16;
          codegen[outIndex++] = n - 3;
          freq[16]!++;
          count -= n;
        }
      } else {
        while (count >= 11) {
          const n = count < 138 ? count : 138;
          codegen[outIndex++] = 18;
          codegen[outIndex++] = n - 11;
          freq[18]!++;
          count -= n;
        }
        if (count >= 3) {
          codegen[outIndex++] = 17;
          codegen[outIndex++] = count - 3;
          freq[17]!++;
          count = 0;
        }
      }
      count--;
      for (; count >= 0; count--) {
        codegen[outIndex++] = size;
        freq[size]!++;
      }
      size = nextSize;
      count = 1;
    }
    codegen[outIndex] = badCode;
  }

  // returns size; numCodegens in this.numCodegens
  numCodegens = 0;
  dynamicSize(litEnc: HuffmanEncoder, offEnc: HuffmanEncoder, extraBits: number): number {
    const cf = this.codegenFreq;
    let numCodegens = codegenCodeCount;
    while (numCodegens > 4 && cf[codegenOrder[numCodegens - 1]!] === 0) numCodegens--;
    const header =
      3 + 5 + 5 + 4 + 3 * numCodegens + bitLength(this.codegenEncoding, cf) + cf[16]! * 2 + cf[17]! * 3 + cf[18]! * 7;
    this.numCodegens = numCodegens;
    return header + bitLength(litEnc, this.literalFreq) + bitLength(offEnc, this.offsetFreq) + extraBits;
  }

  writeCode(enc: HuffmanEncoder, c: number): void {
    this.writeBits(enc.code[c]!, enc.len[c]!);
  }

  writeDynamicHeader(numLiterals: number, numOffsets: number, numCodegens: number, isEof: boolean): void {
    this.writeBits(isEof ? 5 : 4, 3);
    this.writeBits(numLiterals - 257, 5);
    this.writeBits(numOffsets - 1, 5);
    this.writeBits(numCodegens - 4, 4);
    const cge = this.codegenEncoding;
    for (let i = 0; i < numCodegens; i++) this.writeBits(cge.len[codegenOrder[i]!]!, 3);
    const codegen = this.codegen;
    let i = 0;
    for (;;) {
      const codeWord = codegen[i++]!;
      if (codeWord === badCode) break;
      this.writeCode(cge, codeWord);
      if (codeWord === 16) this.writeBits(codegen[i++]!, 2);
      else if (codeWord === 17) this.writeBits(codegen[i++]!, 3);
      else if (codeWord === 18) this.writeBits(codegen[i++]!, 7);
    }
  }

  numLiterals = 0;
  numOffsets = 0;
  indexTokens(n: number): void {
    const lf = this.literalFreq;
    const of = this.offsetFreq;
    lf.fill(0);
    of.fill(0);
    const tokens = this.tokens;
    for (let i = 0; i < n; i++) {
      const t = tokens[i]!;
      if (t < matchType) {
        lf[t]!++;
        continue;
      }
      lf[lengthCodesStart + lengthCodes[(t - matchType) >>> lengthShift]!]!++;
      of[offsetCode(t & offsetMask)]!++;
    }
    let numLiterals = lf.length;
    while (lf[numLiterals - 1] === 0) numLiterals--;
    let numOffsets = of.length;
    while (numOffsets > 0 && of[numOffsets - 1] === 0) numOffsets--;
    if (numOffsets === 0) {
      of[0] = 1;
      numOffsets = 1;
    }
    generate(this.literalEncoding, lf, 15);
    generate(this.offsetEncoding, of, 15);
    this.numLiterals = numLiterals;
    this.numOffsets = numOffsets;
  }

  writeTokens(n: number, le: HuffmanEncoder, oe: HuffmanEncoder): void {
    const tokens = this.tokens;
    const leCode = le.code;
    const leLen = le.len;
    const oeCode = oe.code;
    const oeLen = oe.len;
    const out = this.out;
    let pos = this.outPos;
    let bits = this.bits;
    let nbits = this.nbits;
    for (let i = 0; i < n; i++) {
      const t = tokens[i]!;
      if (t < matchType) {
        bits |= leCode[t]! << nbits;
        nbits += leLen[t]!;
      } else {
        const length = (t - matchType) >>> lengthShift;
        const lc = lengthCodes[length]!;
        bits |= leCode[lc + lengthCodesStart]! << nbits;
        nbits += leLen[lc + lengthCodesStart]!;
        while (nbits >= 8) {
          out[pos++] = bits & 0xff;
          bits >>>= 8;
          nbits -= 8;
        }
        const elb = lengthExtraBits[lc]!;
        if (elb > 0) {
          bits |= (length - lengthBase[lc]!) << nbits;
          nbits += elb;
        }
        const offset = t & offsetMask;
        const oc = offsetCode(offset);
        while (nbits >= 8) {
          out[pos++] = bits & 0xff;
          bits >>>= 8;
          nbits -= 8;
        }
        bits |= oeCode[oc]! << nbits;
        nbits += oeLen[oc]!;
        while (nbits >= 8) {
          out[pos++] = bits & 0xff;
          bits >>>= 8;
          nbits -= 8;
        }
        const eob = offsetExtraBits[oc]!;
        if (eob > 0) {
          bits |= (offset - offsetBase[oc]!) << nbits;
          nbits += eob;
        }
      }
      while (nbits >= 8) {
        out[pos++] = bits & 0xff;
        bits >>>= 8;
        nbits -= 8;
      }
    }
    this.outPos = pos;
    this.bits = bits;
    this.nbits = nbits;
  }

  // huffmanBitWriter.writeBlock; input is window[inStart:inEnd] or absent (inStart < 0).
  hbwWriteBlock(ntok: number, eof: boolean, inStart: number, inEnd: number): void {
    this.ensure(ntok * 8 + (inStart >= 0 ? inEnd - inStart : 0) + 1024);
    this.tokens[ntok] = endBlockMarker;
    const n = ntok + 1;
    this.indexTokens(n);
    const numLiterals = this.numLiterals;
    const numOffsets = this.numOffsets;
    const lf = this.literalFreq;
    const of = this.offsetFreq;

    let extraBits = 0;
    const storable = inStart >= 0 && inEnd - inStart <= maxStoreBlockSize;
    const storedSize = storable ? (inEnd - inStart + 5) * 8 : 0;
    if (storable) {
      for (let lc = lengthCodesStart + 8; lc < numLiterals; lc++) extraBits += lf[lc]! * lengthExtraBits[lc - lengthCodesStart]!;
      for (let oc = 4; oc < numOffsets; oc++) extraBits += of[oc]! * offsetExtraBits[oc]!;
    }

    let literalEncoding = fixedLiteralEncoding;
    let offsetEncoding = fixedOffsetEncoding;
    let size = 3 + bitLength(fixedLiteralEncoding, lf) + bitLength(fixedOffsetEncoding, of) + extraBits;

    this.generateCodegen(numLiterals, numOffsets, this.literalEncoding, this.offsetEncoding);
    generate(this.codegenEncoding, this.codegenFreq, 7);
    const dynamicSize = this.dynamicSize(this.literalEncoding, this.offsetEncoding, extraBits);
    const numCodegens = this.numCodegens;

    if (dynamicSize < size) {
      size = dynamicSize;
      literalEncoding = this.literalEncoding;
      offsetEncoding = this.offsetEncoding;
    }

    if (storable && storedSize < size) {
      this.writeStoredHeader(inEnd - inStart, eof);
      this.writeBytes(inStart, inEnd);
      return;
    }

    if (literalEncoding === fixedLiteralEncoding) this.writeBits(eof ? 3 : 2, 3);
    else this.writeDynamicHeader(numLiterals, numOffsets, numCodegens, eof);
    this.writeTokens(n, literalEncoding, offsetEncoding);
  }

  // compressor.writeBlock
  writeBlock(ntok: number, index: number): void {
    if (index > 0) {
      let s = -1;
      let e = -1;
      if (this.blockStart <= index) {
        s = this.blockStart;
        e = index;
      }
      this.blockStart = index;
      this.hbwWriteBlock(ntok, false, s, e);
    }
  }

  fillDeflate(b: Uint8Array, from: number): number {
    if (this.index >= 2 * windowSize - (minMatchLength + maxMatchLength)) {
      this.window.copyWithin(0, windowSize, 2 * windowSize);
      this.index -= windowSize;
      this.windowEnd -= windowSize;
      if (this.blockStart >= windowSize) this.blockStart -= windowSize;
      else this.blockStart = maxInt32;
      this.hashOffset += windowSize;
      if (this.hashOffset > maxHashOffset) {
        const delta = this.hashOffset - 1;
        this.hashOffset -= delta;
        this.chainHead -= delta;
        const hp = this.hashPrev;
        for (let i = 0; i < hp.length; i++) {
          const v = hp[i]!;
          hp[i] = v > delta ? v - delta : 0;
        }
        const hh = this.hashHead;
        for (let i = 0; i < hh.length; i++) {
          const v = hh[i]!;
          hh[i] = v > delta ? v - delta : 0;
        }
      }
    }
    const n = Math.min(this.window.length - this.windowEnd, b.length - from);
    this.window.set(b.subarray(from, from + n), this.windowEnd);
    this.windowEnd += n;
    return n;
  }

  findMatch(pos: number, prevHead: number, prevLength: number, lookahead: number): boolean {
    const r = findMatchFn(this.window, this.hashPrev, this.hashOffset, pos, prevHead, prevLength, lookahead);
    if (r < 0) return false;
    this.fmLength = r >>> 16;
    this.fmOffset = r & 0xffff;
    return true;
  }

  deflate(): void {
    if (this.windowEnd - this.index < minMatchLength + maxMatchLength && !this.sync) return;
    this.maxInsertIndex = this.windowEnd - (minMatchLength - 1);
    const win = this.window;
    const hashHead = this.hashHead;
    const hashPrev = this.hashPrev;
    const tokens = this.tokens;
    for (;;) {
      const lookahead = this.windowEnd - this.index;
      if (lookahead < minMatchLength + maxMatchLength) {
        if (!this.sync) break;
        if (lookahead === 0) {
          if (this.byteAvailable) {
            tokens[this.ntokens++] = win[this.index - 1]!;
            this.byteAvailable = false;
          }
          if (this.ntokens > 0) {
            this.writeBlock(this.ntokens, this.index);
            this.ntokens = 0;
          }
          break;
        }
      }
      const index = this.index;
      if (index < this.maxInsertIndex) {
        const hash =
          Math.imul((win[index]! << 24) | (win[index + 1]! << 16) | (win[index + 2]! << 8) | win[index + 3]!, hashmul) >>>
          (32 - hashBits);
        const h = hash & hashMask;
        this.chainHead = hashHead[h]!;
        hashPrev[index & windowMask] = this.chainHead;
        hashHead[h] = index + this.hashOffset;
      }
      const prevLength = this.length;
      const prevOffset = this.offset;
      this.length = minMatchLength - 1;
      this.offset = 0;
      let minIndex = index - windowSize;
      if (minIndex < 0) minIndex = 0;

      if (this.chainHead - this.hashOffset >= minIndex && lookahead > prevLength && prevLength < levelLazy) {
        if (this.findMatch(index, this.chainHead - this.hashOffset, minMatchLength - 1, lookahead)) {
          this.length = this.fmLength;
          this.offset = this.fmOffset;
        }
      }
      if (prevLength >= minMatchLength && this.length <= prevLength) {
        // There was a match at the previous step, and the current match is not better.
        tokens[this.ntokens++] =
          matchType + ((prevLength - baseMatchLength) << lengthShift) + (prevOffset - baseMatchOffset);
        const newIndex = index + prevLength - 1;
        const maxInsertIndex = this.maxInsertIndex;
        const hashOffset = this.hashOffset;
        let i = index + 1;
        for (; i < newIndex; i++) {
          if (i < maxInsertIndex) {
            const hash =
              Math.imul((win[i]! << 24) | (win[i + 1]! << 16) | (win[i + 2]! << 8) | win[i + 3]!, hashmul) >>>
              (32 - hashBits);
            const h = hash & hashMask;
            hashPrev[i & windowMask] = hashHead[h]!;
            hashHead[h] = i + hashOffset;
          }
        }
        this.index = i;
        this.byteAvailable = false;
        this.length = minMatchLength - 1;
        if (this.ntokens === maxFlateBlockTokens) {
          this.writeBlock(this.ntokens, this.index);
          this.ntokens = 0;
        }
      } else {
        if (this.byteAvailable) {
          const i = index - 1;
          tokens[this.ntokens++] = win[i]!;
          if (this.ntokens === maxFlateBlockTokens) {
            this.writeBlock(this.ntokens, i + 1);
            this.ntokens = 0;
          }
        }
        this.index = index + 1;
        this.byteAvailable = true;
      }
    }
  }
}


/** Go's gzip.NewWriterLevel(w, gzip.BestCompression), one Write(data), Close(): byte for byte. */
export function goGzipBestCompression(data: Uint8Array | Buffer): Buffer {
  const input = data instanceof Uint8Array ? data : new Uint8Array(data);
  const d = new Deflater(input.length + (input.length >> 3) + 1024);
  // gzip header: ID1 ID2 CM=8 FLG=0 MTIME=0 XFL=2 (BestCompression) OS=255
  d.out.set([0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 2, 255], 0);
  d.outPos = 10;
  // compressor.write
  let from = 0;
  while (from < input.length) {
    d.deflate();
    from += d.fillDeflate(input, from);
  }
  // compressor.close
  d.sync = true;
  d.deflate();
  d.ensure(64);
  d.writeStoredHeader(0, true);
  d.flush();
  // trailer: CRC-32 and ISIZE, little-endian
  const crc = crc32(input) >>> 0;
  const size = input.length >>> 0;
  const o = d.outPos;
  const out = d.out;
  out[o] = crc & 0xff;
  out[o + 1] = (crc >>> 8) & 0xff;
  out[o + 2] = (crc >>> 16) & 0xff;
  out[o + 3] = crc >>> 24;
  out[o + 4] = size & 0xff;
  out[o + 5] = (size >>> 8) & 0xff;
  out[o + 6] = (size >>> 16) & 0xff;
  out[o + 7] = size >>> 24;
  return Buffer.from(out.buffer, out.byteOffset, o + 8);
}
