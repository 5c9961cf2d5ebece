// The script's garbage collector: AssemblyScript's `minimal` runtime (TLSF
// and the two-colour mark & sweep collector `tcms`, invoked once per call
// after the answer is written), with a nursery arena in front of TLSF.
//
// A call's objects (the message, its fields, the outputs, their arrays and
// strings) are bumped off the arena instead of searched for in TLSF's free
// lists; the collection after the call marks what is still reachable, and
// when nothing in the arena is, the arena starts over from its first byte:
// no object of the call is freed one by one. Objects that outlive a call (a
// script's globals, what it keeps in them) stay valid: an arena that holds
// one is retired, kept as it is until its last survivor dies, and a fresh
// arena serves the next call. At most `RETIRED` arenas wait like that; past
// that, the current one keeps bumping until it is full and objects come
// from TLSF as in the plain `minimal` runtime. A call that needs more than
// the arena holds takes the rest from TLSF, and the next arena is twice the
// size, up to `ARENA_MAX`.
//
// The asconfig aliases the runtime's entry points (`__new`, `__renew`,
// `__link`, `__visit`, `__pin`, `__unpin`, `__collect`) to the functions
// here; the compiler still compiles for the `minimal` runtime (no shadow
// stack, no write barriers). The object layout, colours and lists are those
// of AssemblyScript's `std/assembly/rt/tcms.ts` (Apache-2.0), which this
// follows line by line where the arena does not change it.

import {
  AL_MASK,
  AL_SIZE,
  BLOCK,
  BLOCK_OVERHEAD,
  OBJECT_MAXSIZE,
  OBJECT_OVERHEAD,
  TOTAL_OVERHEAD,
} from "rt/common";

// @ts-ignore: decorator
@inline const TRANSPARENT = 3;
// @ts-ignore: decorator
@inline const COLOR_MASK = 3;
/** The first arena's size, and the smallest. */
// @ts-ignore: decorator
@inline const ARENA_MIN: usize = 64 << 10;
/** The largest arena (arenas count against the product's memory limit): calls that need more take the rest from TLSF. */
// @ts-ignore: decorator
@inline const ARENA_MAX: usize = 256 << 10;
/** How many arenas may wait for their survivors to die. */
// @ts-ignore: decorator
@inline const RETIRED = 2;

/** A managed object: header (after TLSF's `mmInfo`), then its data. */
@unmanaged class Object extends BLOCK {
  /** The next object in its list, with the colour in the low bits. */
  nextWithColor: usize;
  prev: Object;
  rtId: u32;
  rtSize: u32;

  get next(): Object {
    return changetype<Object>(this.nextWithColor & ~COLOR_MASK);
  }
  set next(obj: Object) {
    this.nextWithColor = changetype<usize>(obj) | (this.nextWithColor & COLOR_MASK);
  }
  get color(): i32 {
    return i32(this.nextWithColor & COLOR_MASK);
  }
  /** Its size in memory, `mmInfo` included. */
  get size(): usize {
    return BLOCK_OVERHEAD + (this.mmInfo & ~3);
  }
  unlink(): void {
    const next = this.next;
    // Static data not linked yet.
    if (next == null) return;
    const prev = this.prev;
    next.prev = prev;
    prev.next = next;
  }
  linkTo(list: Object, withColor: i32): void {
    const prev = list.prev;
    this.nextWithColor = changetype<usize>(list) | withColor;
    this.prev = prev;
    prev.next = this;
    list.prev = this;
  }
}

function initList(space: Object): Object {
  space.nextWithColor = changetype<usize>(space);
  space.prev = space;
  return space;
}

// @ts-ignore: decorator
@lazy let white = 0;
// @ts-ignore: decorator
@lazy let fromSpace = initList(changetype<Object>(memory.data(offsetof<Object>())));
// @ts-ignore: decorator
@lazy let toSpace = initList(changetype<Object>(memory.data(offsetof<Object>())));
// @ts-ignore: decorator
@lazy let pinSpace = initList(changetype<Object>(memory.data(offsetof<Object>())));

// The current arena: a TLSF block `[arenaBlock, arenaEnd)`; objects are
// carved from `arenaTop`, which stays 16-byte aligned; `arenaLive` counts
// the objects in it that the collector has not found dead yet.
// @ts-ignore: decorator
@lazy let arenaBlock: usize = 0;
// @ts-ignore: decorator
@lazy let arenaEnd: usize = 0;
// @ts-ignore: decorator
@lazy let arenaTop: usize = 0;
// @ts-ignore: decorator
@lazy let arenaLive: i32 = 0;
// @ts-ignore: decorator
@lazy let arenaSize: usize = ARENA_MIN;
/** Whether a call since the last collection ran out of arena. */
// @ts-ignore: decorator
@lazy let arenaOverflowed = false;
// Retired arenas: block, end, live objects; a block of 0 is a free slot.
const retired: usize = memory.data(RETIRED * 3 * sizeof<usize>(), 16);

@inline function retiredAt(slot: i32, field: i32): usize {
  return retired + <usize>(slot * 3 + field) * sizeof<usize>();
}

/** The first object's block in an arena starting at `block`. */
@inline function arenaFirst(block: usize): usize {
  // A TLSF block is 16-aligned; an object's block must be too, with its
  // `mmInfo` in the four bytes before it.
  return block + AL_SIZE;
}

function startArena(): void {
  arenaBlock = __alloc(arenaSize);
  arenaEnd = arenaBlock + arenaSize;
  arenaTop = arenaFirst(arenaBlock);
  arenaLive = 0;
}

/** An object's block from the arena, or 0 when it is full. */
@inline function arenaAlloc(payload: usize): usize {
  // Room for the payload and the next object's `mmInfo`, 16-aligned.
  const need = (payload + BLOCK_OVERHEAD + AL_MASK) & ~AL_MASK;
  if (arenaBlock == 0) startArena();
  const block = arenaTop;
  if (need > arenaEnd - block) {
    arenaOverflowed = true;
    return 0;
  }
  arenaTop = block + need;
  arenaLive++;
  store<usize>(block - BLOCK_OVERHEAD, need - BLOCK_OVERHEAD); // mmInfo
  return block;
}

@inline function inArena(obj: usize, block: usize, end: usize): bool {
  return obj >= block && obj < end;
}

/** `arenaOf` of an object in the current arena. */
// @ts-ignore: decorator
@inline const CURRENT = -1;
/** `arenaOf` of an object TLSF holds. */
// @ts-ignore: decorator
@inline const TLSF = RETIRED;

/** Where static data lives (below `__heap_base`), for `__renew`. */
// @ts-ignore: decorator
@inline const STATIC = RETIRED + 1;

/** Where the object at `at` lives: `CURRENT`, a retired slot, or `TLSF`. */
function arenaOf(at: usize): i32 {
  if (inArena(at, arenaBlock, arenaEnd)) return CURRENT;
  for (let slot = 0; slot < RETIRED; slot++) {
    const block = load<usize>(retiredAt(slot, 0));
    if (block != 0 && inArena(at, block, load<usize>(retiredAt(slot, 1)))) return slot;
  }
  return TLSF;
}

/** Frees a dead object: its arena forgets it, or TLSF takes it back. */
function release(obj: Object): void {
  const at = changetype<usize>(obj);
  const home = arenaOf(at);
  if (home == CURRENT) {
    arenaLive--;
  } else if (home == TLSF) {
    __free(at + BLOCK_OVERHEAD);
  } else {
    const live = load<usize>(retiredAt(home, 2)) - 1;
    store<usize>(retiredAt(home, 2), live);
    if (live == 0) {
      __free(load<usize>(retiredAt(home, 0)));
      store<usize>(retiredAt(home, 0), 0);
    }
  }
}

/** After a collection: reset, regrow or retire the current arena. */
function settleArena(): void {
  if (arenaBlock == 0) return;
  if (arenaLive == 0) {
    if (arenaOverflowed && arenaSize < ARENA_MAX) {
      __free(arenaBlock);
      arenaBlock = 0;
      arenaEnd = 0;
      arenaSize <<= 1;
    } else {
      arenaTop = arenaFirst(arenaBlock);
    }
    arenaOverflowed = false;
    return;
  }
  for (let slot = 0; slot < RETIRED; slot++) {
    if (load<usize>(retiredAt(slot, 0)) == 0) {
      store<usize>(retiredAt(slot, 0), arenaBlock);
      store<usize>(retiredAt(slot, 1), arenaEnd);
      store<usize>(retiredAt(slot, 2), <usize>arenaLive);
      arenaBlock = 0;
      arenaEnd = 0;
      arenaOverflowed = false;
      return;
    }
  }
  // No slot: this arena keeps its survivors and bumps on until it is full.
}

// @ts-ignore: decorator
@global @unsafe
export function __sluice_new(size: usize, id: i32): usize {
  if (size > OBJECT_MAXSIZE) throw new Error("allocation too large");
  const payload = OBJECT_OVERHEAD + size;
  let block = arenaAlloc(payload);
  if (block == 0) block = __alloc(payload);
  const obj = changetype<Object>(block - BLOCK_OVERHEAD);
  obj.rtId = id;
  obj.rtSize = <u32>size;
  obj.linkTo(fromSpace, white);
  return block + OBJECT_OVERHEAD;
}

// @ts-ignore: decorator
@global @unsafe
export function __sluice_renew(oldPtr: usize, size: usize): usize {
  const oldObj = changetype<Object>(oldPtr - TOTAL_OVERHEAD);
  const oldBlock = oldPtr - OBJECT_OVERHEAD;
  if (size > OBJECT_MAXSIZE) throw new Error("allocation too large");
  const home = oldPtr < __heap_base ? STATIC : arenaOf(changetype<usize>(oldObj));
  if (home == TLSF) {
    // A TLSF object grows in place or moves with its links.
    const newPtr = __realloc(oldBlock, OBJECT_OVERHEAD + size) + OBJECT_OVERHEAD;
    const newObj = changetype<Object>(newPtr - TOTAL_OVERHEAD);
    newObj.rtSize = <u32>size;
    newObj.next.prev = newObj;
    newObj.prev.next = newObj;
    return newPtr;
  }
  if (home == CURRENT) {
    const need = (OBJECT_OVERHEAD + size + BLOCK_OVERHEAD + AL_MASK) & ~AL_MASK;
    if (oldBlock + oldObj.size == arenaTop) {
      // The arena's newest object grows or shrinks in place when there is room.
      if (need <= arenaEnd - oldBlock) {
        arenaTop = oldBlock + need;
        oldObj.mmInfo = need - BLOCK_OVERHEAD;
        oldObj.rtSize = <u32>size;
        return oldPtr;
      }
    } else if (need <= oldObj.size) {
      // Any arena object shrinks in place.
      oldObj.rtSize = <u32>size;
      return oldPtr;
    }
  }
  // Static data, an arena object below the top, or no room: a new object
  // takes the bytes, and the old one is released now (nothing refers to it
  // once the caller stores the new pointer).
  const newPtr = __sluice_new(size, oldObj.rtId);
  memory.copy(newPtr, oldPtr, min(size, <usize>oldObj.rtSize));
  if (home != STATIC) {
    if (oldObj.color == TRANSPARENT) {
      const newObj = changetype<Object>(newPtr - TOTAL_OVERHEAD);
      newObj.unlink();
      newObj.linkTo(pinSpace, TRANSPARENT);
    }
    oldObj.unlink();
    release(oldObj);
  }
  return newPtr;
}

// @ts-ignore: decorator
@global @unsafe
export function __sluice_link(parentPtr: usize, childPtr: usize, expectMultiple: bool): void {
  // Nothing: the collector runs only between calls.
}

// @ts-ignore: decorator
@global @unsafe
export function __sluice_visit(ptr: usize, cookie: i32): void {
  if (!ptr) return;
  const obj = changetype<Object>(ptr - TOTAL_OVERHEAD);
  if (obj.color == white) {
    obj.unlink();
    obj.linkTo(toSpace, i32(!white));
  }
}

// @ts-ignore: decorator
@global @unsafe
export function __sluice_pin(ptr: usize): usize {
  if (ptr) {
    const obj = changetype<Object>(ptr - TOTAL_OVERHEAD);
    if (obj.color == TRANSPARENT) throw new Error("object already pinned");
    obj.unlink();
    obj.linkTo(pinSpace, TRANSPARENT);
  }
  return ptr;
}

// @ts-ignore: decorator
@global @unsafe
export function __sluice_unpin(ptr: usize): void {
  if (!ptr) return;
  const obj = changetype<Object>(ptr - TOTAL_OVERHEAD);
  if (obj.color != TRANSPARENT) throw new Error("object not pinned");
  obj.unlink();
  obj.linkTo(fromSpace, white);
}

// @ts-ignore: decorator
@global @unsafe
export function __sluice_collect(): void {
  // Mark the roots, the members of pinned objects, and what they reach.
  __visit_globals(0);
  const pn = pinSpace;
  let iter = pn.next;
  while (iter != pn) {
    __visit_members(changetype<usize>(iter) + TOTAL_OVERHEAD, 0);
    iter = iter.next;
  }
  const black = i32(!white);
  const to = toSpace;
  iter = to.next;
  while (iter != to) {
    __visit_members(changetype<usize>(iter) + TOTAL_OVERHEAD, 0);
    iter = iter.next;
  }
  // Sweep what was not reached.
  const from = fromSpace;
  iter = from.next;
  while (iter != from) {
    const newNext = iter.next;
    if (changetype<usize>(iter) < __heap_base) {
      iter.nextWithColor = 0;
      iter.prev = changetype<Object>(0);
    } else {
      release(iter);
    }
    iter = newNext;
  }
  from.nextWithColor = changetype<usize>(from);
  from.prev = from;
  fromSpace = to;
  toSpace = from;
  white = black;
  settleArena();
}
