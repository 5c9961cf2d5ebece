//! The heap of a script on WebAssembly: small blocks in size classes, each
//! class a free list, carved from 64 KiB chunks; large blocks from the
//! standard allocator.
//!
//! A call allocates its message, fields and outputs and frees them all
//! before the next call, so in steady state every allocation is a pop from
//! its class's list and every free a push: a handful of instructions, no
//! searching, splitting or merging. Unlike an arena that is reset between
//! calls, blocks that outlive a call (a `OnceLock`, a cache in a `static`)
//! stay valid. A block freed into a class is reused only by that class;
//! chunks are never returned, so the heap stays at the peak a script
//! reached (within the product's memory limit).
//!
//! WebAssembly scripts run one call at a time on one thread, so the state
//! needs no lock.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::ptr;

/// Block sizes, each a multiple of 8 (so every block is 8-aligned).
const CLASSES: [usize; 20] = [
    8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144,
    8192,
];
/// The largest block served from a class.
const SMALL: usize = 8192;
/// What is carved at a time.
const CHUNK: usize = 64 << 10;

/// The class of every size up to [`SMALL`], by `(size + 7) / 8`.
const CLASS_OF: [u8; SMALL / 8 + 1] = {
    let mut table = [0u8; SMALL / 8 + 1];
    let mut slot = 0;
    let mut class = 0;
    while slot <= SMALL / 8 {
        while CLASSES[class] < slot * 8 {
            class += 1;
        }
        table[slot] = class as u8;
        slot += 1;
    }
    table
};

struct Heap {
    /// The first free block of each class; a free block holds the next.
    free: [*mut u8; CLASSES.len()],
    /// The uncarved rest of the current chunk.
    next: *mut u8,
    end: *mut u8,
}

/// The allocator behind `#[global_allocator]`.
pub(crate) struct ScriptHeap(UnsafeCell<Heap>);

// SAFETY: a script runs on one thread (wasm32 without threads), so the heap
// is never touched from two at once.
unsafe impl Sync for ScriptHeap {}

impl ScriptHeap {
    const fn new() -> Self {
        ScriptHeap(UnsafeCell::new(Heap {
            free: [ptr::null_mut(); CLASSES.len()],
            next: ptr::null_mut(),
            end: ptr::null_mut(),
        }))
    }
}

fn class(layout: Layout) -> Option<usize> {
    if layout.size() > SMALL || layout.align() > 8 {
        return None;
    }
    Some(CLASS_OF[layout.size().div_ceil(8)] as usize)
}

impl Heap {
    /// Carves a block of class `class` from the current chunk, starting a
    /// new chunk when it is used up (its rest goes to the smaller classes).
    unsafe fn carve(&mut self, class: usize) -> *mut u8 {
        let size = CLASSES[class];
        if (self.end as usize) - (self.next as usize) < size {
            unsafe { self.retire_rest() };
            // SAFETY: the layout is valid and not zero-sized.
            let chunk = unsafe { System.alloc(Layout::from_size_align_unchecked(CHUNK, 8)) };
            if chunk.is_null() {
                return chunk;
            }
            self.next = chunk;
            // SAFETY: `chunk` is CHUNK bytes long.
            self.end = unsafe { chunk.add(CHUNK) };
        }
        let block = self.next;
        // SAFETY: at least `size` bytes remain in the chunk.
        self.next = unsafe { block.add(size) };
        block
    }

    /// Hands the uncarved rest of the chunk to the free lists, largest
    /// class first, so nothing is lost when a new chunk starts.
    unsafe fn retire_rest(&mut self) {
        for class in (0..CLASSES.len()).rev() {
            let size = CLASSES[class];
            while (self.end as usize) - (self.next as usize) >= size {
                let block = self.next;
                // SAFETY: `size` bytes remain, so the block is inside the chunk.
                unsafe {
                    self.next = block.add(size);
                    self.push(class, block);
                }
            }
        }
    }

    unsafe fn push(&mut self, class: usize, block: *mut u8) {
        // SAFETY: blocks are at least 8 bytes and 8-aligned.
        unsafe { block.cast::<*mut u8>().write(self.free[class]) };
        self.free[class] = block;
    }
}

unsafe impl GlobalAlloc for ScriptHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some(class) = class(layout) else {
            return unsafe { System.alloc(layout) };
        };
        // SAFETY: one thread; no other reference to the heap is alive.
        let heap = unsafe { &mut *self.0.get() };
        let block = heap.free[class];
        if block.is_null() {
            return unsafe { heap.carve(class) };
        }
        // SAFETY: a free block holds the next free block of its class.
        heap.free[class] = unsafe { block.cast::<*mut u8>().read() };
        block
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        match class(layout) {
            None => unsafe { System.dealloc(block, layout) },
            // SAFETY: one thread; `block` came from this class.
            Some(class) => unsafe { (*self.0.get()).push(class, block) },
        }
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller passes a valid layout and a size that, with
        // its alignment, makes a valid layout.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (class(layout), class(new_layout)) {
            (Some(old), Some(new)) if old == new => block,
            (None, None) => unsafe { System.realloc(block, layout, new_size) },
            _ => {
                let moved = unsafe { self.alloc(new_layout) };
                if !moved.is_null() {
                    // SAFETY: both blocks hold at least the smaller size.
                    unsafe {
                        ptr::copy_nonoverlapping(block, moved, layout.size().min(new_size));
                        self.dealloc(block, layout);
                    }
                }
                moved
            }
        }
    }
}

#[cfg(target_arch = "wasm32")]
#[global_allocator]
static HEAP: ScriptHeap = ScriptHeap::new();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_size_gets_an_aligned_block_of_its_class_and_freed_blocks_come_back() {
        let heap = ScriptHeap::new();
        for size in 1..=SMALL {
            let class = class(Layout::from_size_align(size, 1).unwrap()).unwrap();
            assert!(CLASSES[class] >= size);
            assert!(class == 0 || CLASSES[class - 1] < size, "size {size}");
        }
        unsafe {
            let layout = Layout::from_size_align(40, 8).unwrap();
            let a = heap.alloc(layout);
            let b = heap.alloc(layout);
            assert_eq!(a as usize % 8, 0);
            assert_eq!(b as usize - a as usize, 48);
            heap.dealloc(a, layout);
            assert_eq!(heap.alloc(layout), a, "the freed block is reused first");
            heap.dealloc(a, layout);
            heap.dealloc(b, layout);
        }
    }

    #[test]
    fn blocks_across_chunks_and_reallocs_keep_their_bytes() {
        let heap = ScriptHeap::new();
        unsafe {
            // Three chunks' worth of blocks, each filled with its number.
            let layout = Layout::from_size_align(1000, 8).unwrap();
            let blocks: Vec<*mut u8> = (0..200)
                .map(|i| {
                    let block = heap.alloc(layout);
                    ptr::write_bytes(block, i as u8, 1000);
                    block
                })
                .collect();
            for (i, &block) in blocks.iter().enumerate() {
                assert!(
                    std::slice::from_raw_parts(block, 1000)
                        .iter()
                        .all(|&b| b == i as u8)
                );
            }
            // Growing within the class keeps the block; across classes and
            // into the large range moves it with its bytes.
            let grown = heap.realloc(blocks[0], layout, 1020);
            assert_eq!(grown, blocks[0]);
            let moved = heap.realloc(grown, Layout::from_size_align(1020, 8).unwrap(), 20_000);
            assert!(
                std::slice::from_raw_parts(moved, 1000)
                    .iter()
                    .all(|&b| b == 0)
            );
            heap.dealloc(moved, Layout::from_size_align(20_000, 8).unwrap());
            for &block in &blocks[1..] {
                heap.dealloc(block, layout);
            }
            // Over-aligned requests go to the standard allocator.
            let aligned = Layout::from_size_align(64, 64).unwrap();
            let block = heap.alloc(aligned);
            assert_eq!(block as usize % 64, 0);
            heap.dealloc(block, aligned);
        }
    }
}
