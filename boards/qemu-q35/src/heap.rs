//! The board's global allocator: a locked bump allocator over a static
//! arena, for crates that need `alloc` (dma-api links it, whether or not its
//! paths allocate). Nothing on the library's paths allocates.
//!
//! Blocks are carved from the front; a free of the last block carved takes
//! it back, and when every block is free the arena starts over. Enough for
//! the few, short-lived allocations of a test image; exhausted, it returns
//! null (an allocation error), never memory it does not own.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;

/// Arena size.
const ARENA: usize = 64 * 1024;

#[repr(C, align(4096))]
struct Arena(UnsafeCell<[u8; ARENA]>);

// SAFETY: the arena is only reached through `Heap`, whose mutex hands each
// block to one owner.
unsafe impl Sync for Arena {}

static ARENA_BYTES: Arena = Arena(UnsafeCell::new([0; ARENA]));

/// Next free offset and number of live blocks.
struct Bump {
    next: usize,
    live: usize,
}

/// The allocator (see the module docs).
pub struct Heap(spin::Mutex<Bump>);

impl Heap {
    /// Blocks currently allocated.
    pub fn live(&self) -> usize {
        self.0.lock().live
    }
}

#[global_allocator]
/// The board's global allocator.
pub static HEAP: Heap = Heap(spin::Mutex::new(Bump { next: 0, live: 0 }));

// SAFETY: blocks never overlap (each is carved past `next`, which only moves
// back over the last block once it is freed, or to 0 once none is live), lie
// inside the arena, and are aligned as `layout` asks.
unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let mut b = self.0.lock();
        let base = ARENA_BYTES.0.get() as usize;
        let Some(start) = (base + b.next).checked_next_multiple_of(layout.align()) else {
            return core::ptr::null_mut();
        };
        let Some(end) = start.checked_add(layout.size()) else {
            return core::ptr::null_mut();
        };
        if end > base + ARENA {
            return core::ptr::null_mut();
        }
        b.next = end - base;
        b.live += 1;
        start as *mut u8
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let mut b = self.0.lock();
        let base = ARENA_BYTES.0.get() as usize;
        b.live = b.live.saturating_sub(1);
        if b.live == 0 {
            b.next = 0;
        } else if ptr as usize + layout.size() == base + b.next {
            b.next = ptr as usize - base;
        }
    }
}
