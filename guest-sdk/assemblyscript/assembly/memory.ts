// Memory that crosses the boundary: blocks the host asks for through
// `cabi_realloc` (the packed message, the answers of host functions), which
// the script owns and frees once read, and the answer buffer the packed
// outputs are written into, which is kept and reused from call to call (the
// host copies the answer before the call returns). Both live outside the
// garbage-collected heap, so the collector neither moves nor frees them
// behind the host's back.

/** What `cabi_realloc` hands out for a zero-sized request: never freed. */
function isDangling(ptr: usize): bool {
  return ptr < 16;
}

/** The canonical ABI's allocator: `(old, old size, align, new size) -> ptr`. */
export function realloc(old: usize, oldSize: usize, align: usize, newSize: usize): usize {
  if (newSize == 0) {
    if (old != 0 && !isDangling(old)) heap.free(old);
    // Any aligned address is a valid zero-length block.
    return align;
  }
  // The heap's blocks are 16-byte aligned, more than any WIT type needs.
  if (old == 0 || isDangling(old)) return heap.alloc(newSize);
  return heap.realloc(old, newSize);
}

/** Frees a block the host allocated through `realloc`. */
export function freeBlock(ptr: usize, size: usize): void {
  if (size != 0 && !isDangling(ptr)) heap.free(ptr);
}

/** Copies `len` bytes at `ptr` into a new array and frees the block. */
export function takeBytes(ptr: usize, len: usize): Uint8Array {
  const bytes = new Uint8Array(<i32>len);
  memory.copy(bytes.dataStart, ptr, len);
  freeBlock(ptr, len);
  return bytes;
}

/** Decodes `len` UTF-8 bytes at `ptr` and frees the block. */
export function takeString(ptr: usize, len: usize): string {
  const text = len == 0 ? "" : String.UTF8.decodeUnsafe(ptr, len);
  freeBlock(ptr, len);
  return text;
}

/**
 * Reads the packed encoding's primitives from raw memory, front to back.
 * The host writes well-formed messages; a read past the end returns zeros
 * and sets `short`, which the caller reports.
 */
export class PackedReader {
  private at: usize;
  private end: usize;
  /** Set once a read went past the end. */
  short: bool = false;

  constructor(ptr: usize, len: usize) {
    this.at = ptr;
    this.end = ptr + len;
  }

  /** Reads `len` bytes at `ptr` from the start, so one reader serves every call. */
  reset(ptr: usize, len: usize): PackedReader {
    this.at = ptr;
    this.end = ptr + len;
    this.short = false;
    return this;
  }

  private take(size: usize): usize {
    if (this.end - this.at < size) {
      this.short = true;
      this.at = this.end;
      return 0;
    }
    const at = this.at;
    this.at += size;
    return at;
  }

  u8(): u8 {
    const at = this.take(1);
    return at == 0 ? 0 : load<u8>(at);
  }
  u32(): u32 {
    const at = this.take(4);
    return at == 0 ? 0 : load<u32>(at);
  }
  i64(): i64 {
    const at = this.take(8);
    return at == 0 ? 0 : load<i64>(at);
  }
  f64(): f64 {
    const at = this.take(8);
    return at == 0 ? 0 : load<f64>(at);
  }
  string(): string {
    const len = <usize>this.u32();
    const at = this.take(len);
    return at == 0 || len == 0 ? "" : String.UTF8.decodeUnsafe(at, len);
  }
  /**
   * A packed `str` or `bytes` left in place: its offset from `base`
   * (`spanLength` holds its length; both are 0 when it is cut short).
   */
  span(base: usize): i32 {
    const len = <usize>this.u32();
    const at = this.take(len);
    this.spanLength = at == 0 ? 0 : <i32>len;
    return at == 0 ? 0 : <i32>(at - base);
  }
  /** The length of the last `span`. */
  spanLength: i32 = 0;
}

/**
 * The answer being written: one block outside the collected heap, grown by
 * doubling and kept for the next call, so a call writes its outputs with
 * no allocation once the buffer has reached their size.
 */
export class Answer {
  static start: usize = 0;
  static capacity: usize = 0;
  static length: usize = 0;

  /** Starts a new answer. */
  static reset(): void {
    Answer.length = 0;
  }

  /** Room for `size` more bytes; the address to write them at. */
  @inline
  static reserve(size: usize): usize {
    const needed = Answer.length + size;
    if (needed > Answer.capacity) Answer.grow(needed);
    return Answer.start + Answer.length;
  }

  private static grow(needed: usize): void {
    let capacity = Answer.capacity < 256 ? <usize>256 : Answer.capacity;
    while (capacity < needed) capacity <<= 1;
    Answer.start = Answer.start == 0 ? heap.alloc(capacity) : heap.realloc(Answer.start, capacity);
    Answer.capacity = capacity;
  }

  static u8(value: u8): void {
    store<u8>(Answer.reserve(1), value);
    Answer.length += 1;
  }
  static u32(value: u32): void {
    store<u32>(Answer.reserve(4), value);
    Answer.length += 4;
  }
  static i64(value: i64): void {
    store<i64>(Answer.reserve(8), value);
    Answer.length += 8;
  }
  /** A placeholder `u32` to fill in with `patch`; its offset. */
  static hole(): usize {
    const at = Answer.length;
    Answer.u32(0);
    return at;
  }
  static patch(at: usize, value: u32): void {
    store<u32>(Answer.start + at, value);
  }
  /** `text` as a packed `str`: its UTF-8 length, then its UTF-8 bytes. */
  static str(text: string): void {
    const units = <usize>text.length;
    // A UTF-16 code unit becomes at most three UTF-8 bytes.
    const at = Answer.reserve(4 + units * 3);
    // Unpaired surrogates become U+FFFD: the host accepts only UTF-8.
    const len: usize = units == 0
      ? <usize>0
      : String.UTF8.encodeUnsafe(
          changetype<usize>(text), <i32>units, at + 4, false, String.UTF8.ErrorMode.REPLACE,
        );
    store<u32>(at, <u32>len);
    Answer.length += 4 + len;
  }
}

/**
 * A string's UTF-8 bytes for one host call, in a block outside the
 * collected heap that is kept and reused, so passing a key or a log line to
 * the host allocates nothing once the block is large enough. The bytes stay
 * valid until the next `Scratch.utf8`.
 */
export class Scratch {
  private static start: usize = 0;
  private static capacity: usize = 0;
  /** The length of the last `utf8`. */
  static length: usize = 0;

  /** `text` as UTF-8 (unpaired surrogates become U+FFFD); its address. */
  static utf8(text: string): usize {
    const units = <usize>text.length;
    // A UTF-16 code unit becomes at most three UTF-8 bytes.
    const needed = units * 3;
    if (needed > Scratch.capacity) {
      let capacity = Scratch.capacity < 64 ? <usize>64 : Scratch.capacity;
      while (capacity < needed) capacity <<= 1;
      Scratch.start = Scratch.start == 0 ? heap.alloc(capacity) : heap.realloc(Scratch.start, capacity);
      Scratch.capacity = capacity;
    }
    Scratch.length = units == 0
      ? 0
      : <usize>String.UTF8.encodeUnsafe(
          changetype<usize>(text), <i32>units, Scratch.start, false, String.UTF8.ErrorMode.REPLACE,
        );
    return Scratch.start;
  }
}
