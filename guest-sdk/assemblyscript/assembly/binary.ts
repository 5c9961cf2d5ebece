// Binary payloads: a big/little-endian reader and hex helpers.

/**
 * Reads numbers from a byte array, front to back. Reading past the end
 * returns 0 and sets `truncated`, so a decoder can read a whole frame and
 * check once: `if (r.truncated) return Result.err("short-payload", ...)`.
 */
export class Reader {
  private offset: i32 = 0;
  /** Set once any read went past the end. */
  truncated: bool = false;

  constructor(private readonly bytes: Uint8Array) {}

  /** Bytes read so far. */
  get position(): i32 {
    return this.offset;
  }
  /** Bytes left. */
  get remaining(): i32 {
    return this.bytes.length - this.offset;
  }

  private take(size: i32): usize {
    if (this.offset + size > this.bytes.length) {
      this.truncated = true;
      this.offset = this.bytes.length;
      return 0;
    }
    const at = this.bytes.dataStart + <usize>this.offset;
    this.offset += size;
    return at;
  }

  /** Skips `size` bytes. */
  skip(size: i32): void {
    this.take(size);
  }
  /** The next `size` bytes as a new array (empty when truncated). */
  bytesOf(size: i32): Uint8Array {
    const at = this.take(size);
    if (at == 0) return new Uint8Array(0);
    return this.bytes.slice(this.offset - size, this.offset);
  }

  u8(): u8 {
    const at = this.take(1);
    return at == 0 ? 0 : load<u8>(at);
  }
  i8(): i8 {
    return <i8>this.u8();
  }
  u16be(): u16 {
    const at = this.take(2);
    return at == 0 ? 0 : bswap<u16>(load<u16>(at));
  }
  u16le(): u16 {
    const at = this.take(2);
    return at == 0 ? 0 : load<u16>(at);
  }
  i16be(): i16 {
    return <i16>this.u16be();
  }
  i16le(): i16 {
    return <i16>this.u16le();
  }
  u32be(): u32 {
    const at = this.take(4);
    return at == 0 ? 0 : bswap<u32>(load<u32>(at));
  }
  u32le(): u32 {
    const at = this.take(4);
    return at == 0 ? 0 : load<u32>(at);
  }
  i32be(): i32 {
    return <i32>this.u32be();
  }
  i32le(): i32 {
    return <i32>this.u32le();
  }
  f32be(): f32 {
    return reinterpret<f32>(this.u32be());
  }
  f32le(): f32 {
    return reinterpret<f32>(this.u32le());
  }
}

const HEX_DIGITS = "0123456789abcdef";

/** Lower-case hex of `bytes`. */
export function hexEncode(bytes: Uint8Array): string {
  let out = "";
  for (let i = 0; i < bytes.length; i++) {
    const b = unchecked(bytes[i]);
    out += HEX_DIGITS.charAt(b >> 4) + HEX_DIGITS.charAt(b & 15);
  }
  return out;
}

function hexValue(c: i32): i32 {
  if (c >= 48 && c <= 57) return c - 48;
  if (c >= 97 && c <= 102) return c - 87;
  if (c >= 65 && c <= 70) return c - 55;
  return -1;
}

/** The bytes of hex `text` (spaces ignored), or `null` when it is not hex. */
export function hexDecode(text: string): Uint8Array | null {
  const digits = text.replaceAll(" ", "");
  if (digits.length % 2 != 0) return null;
  const out = new Uint8Array(digits.length / 2);
  for (let i = 0; i < out.length; i++) {
    const hi = hexValue(digits.charCodeAt(2 * i));
    const lo = hexValue(digits.charCodeAt(2 * i + 1));
    if (hi < 0 || lo < 0) return null;
    out[i] = <u8>((hi << 4) | lo);
  }
  return out;
}
