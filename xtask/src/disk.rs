//! The raw disk image behind the boards' virtio-blk: 1 MiB, sector `s`
//! filled with the bytes `boards/common/src/virtio_dma.rs::sector_byte`
//! gives (the board checks what it reads against that function, so the two
//! must agree). Tests write to it, so each QEMU run gets a fresh one.

use std::path::{Path, PathBuf};

/// Sectors of the image (`virtio_dma::IMAGE_SECTORS`).
const SECTORS: u64 = 2048;
const SECTOR_SIZE: usize = 512;
/// File name under the board's `target/` directory.
const NAME: &str = "virtio-blk.img";

/// Byte `i` of sector `sector`: its number (8 bytes, little endian), then a
/// pattern of the index and the sector number.
fn sector_byte(sector: u64, i: usize) -> u8 {
    if i < 8 {
        return (sector >> (8 * i)) as u8;
    }
    (i as u8)
        ^ ((i >> 8) as u8).wrapping_mul(0x3d)
        ^ (sector as u8).wrapping_mul(0x65)
        ^ ((sector >> 8) as u8).wrapping_mul(0x9b)
        ^ 0x5a
}

/// The image's bytes.
fn contents() -> Vec<u8> {
    (0..SECTORS)
        .flat_map(|s| (0..SECTOR_SIZE).map(move |i| sector_byte(s, i)))
        .collect()
}

/// (Re)writes the image under `board_dir/target/`; returns its path.
pub fn create(board_dir: &Path) -> Result<PathBuf, String> {
    let dir = board_dir.join("target");
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let path = dir.join(NAME);
    std::fs::write(&path, contents()).map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(path)
}

/// The QEMU arguments that put the image behind a modern-only virtio-blk at
/// `slot`, DMA through the IOMMU (`iommu_platform=on`).
pub fn qemu_args(image: &Path, slot: &str) -> Vec<String> {
    vec![
        "-drive".into(),
        format!("file={},if=none,id=d0,format=raw", image.display()),
        "-device".into(),
        format!("virtio-blk-pci,drive=d0,addr={slot},iommu_platform=on,disable-legacy=on"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_is_one_mib_of_numbered_sectors() {
        let img = contents();
        assert_eq!(img.len(), 1 << 20);
        // Sector 0x102 starts with its number and differs from sector 2.
        let at = 0x102 * SECTOR_SIZE;
        assert_eq!(&img[at..at + 8], &[0x02, 0x01, 0, 0, 0, 0, 0, 0]);
        assert_eq!(img[at + 8], 8 ^ (2u8.wrapping_mul(0x65)) ^ 0x9b ^ 0x5a);
        assert_ne!(img[at + 8..at + 512], img[2 * 512 + 8..3 * 512]);
    }
}
