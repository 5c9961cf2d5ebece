// Memory that crosses the boundary: blocks the host asks for through
// `cabi_realloc` (arguments, returned lists), which the script owns and frees
// once copied, and the blocks of a result, kept until the host's post-return
// call. They live outside the garbage-collected heap, so the collector
// neither moves nor frees them behind the host's back.

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

// Blocks of the result being handed to the host, freed by `releaseResult`.
// Raw addresses, so the collector does not look inside.
let resultBlocks = new Array<usize>();

/** A zeroed block of `size` bytes that lives until the post-return call. */
export function resultBlock(size: usize): usize {
  if (size == 0) return 8;
  const ptr = heap.alloc(size);
  memory.fill(ptr, 0, size);
  resultBlocks.push(ptr);
  return ptr;
}

/** `text` as UTF-8 in a result block; stores (pointer, length) at `at`. */
export function storeString(at: usize, text: string): void {
  const len = <usize>String.UTF8.byteLength(text);
  const ptr = resultBlock(len);
  if (len != 0) String.UTF8.encodeUnsafe(changetype<usize>(text), text.length, ptr);
  store<u32>(at, <u32>ptr);
  store<u32>(at, <u32>len, 4);
}

/** Frees every block of the last result (the host has copied it). */
export function releaseResult(): void {
  for (let i = 0; i < resultBlocks.length; i++) heap.free(unchecked(resultBlocks[i]));
  resultBlocks.length = 0;
}
