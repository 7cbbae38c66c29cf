//! How a disk boots: with UEFI (tart's default) it needs an EFI system partition, in a GPT or an
//! MBR partition table; without one, an MBR boot loader still boots it with BIOS on x86.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use tart_home::BootFirmware;

const SECTOR: u64 = 512;
/// MBR partition type of an EFI system partition, and of the protective entry of a GPT disk.
const MBR_ESP: u8 = 0xef;
const MBR_GPT: u8 = 0xee;
/// The ESP's GPT type GUID C12A7328-F81F-11D2-BA4B-00A0C93EC93B, as stored (mixed-endian).
const GPT_ESP: [u8; 16] = [
    0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9, 0x3b,
];
/// More entries than any partitioning tool writes (128 is the norm): a corrupt header.
const MAX_GPT_ENTRIES: u32 = 1024;

/// The firmware that boots the raw disk at `path`, if any can: UEFI when it has an EFI system
/// partition, else BIOS when its first sector holds a boot loader (GRUB's `boot.img` sits there
/// on MBR and GPT disks alike).
pub fn boot_firmware(path: &Path) -> io::Result<Option<BootFirmware>> {
    if has_efi_system_partition(path)? {
        return Ok(Some(BootFirmware::Uefi));
    }
    let mut mbr = [0u8; SECTOR as usize];
    File::open(path)?.read_exact_at(&mut mbr, 0)?;
    let boot_code = &mbr[..440];
    Ok((mbr[510..] == [0x55, 0xaa] && boot_code.iter().any(|&b| b != 0)).then_some(BootFirmware::Bios))
}

/// Whether the raw disk at `path` has an EFI system partition.
fn has_efi_system_partition(path: &Path) -> io::Result<bool> {
    let disk = File::open(path)?;
    let mut mbr = [0u8; SECTOR as usize];
    disk.read_exact_at(&mut mbr, 0)?;
    if mbr[510..] != [0x55, 0xaa] {
        return Ok(false);
    }
    let types: Vec<u8> = (0..4).map(|i| mbr[446 + 16 * i + 4]).collect();
    if types.contains(&MBR_ESP) {
        return Ok(true);
    }
    if !types.contains(&MBR_GPT) {
        return Ok(false);
    }
    let mut header = [0u8; SECTOR as usize];
    disk.read_exact_at(&mut header, SECTOR)?;
    if &header[..8] != b"EFI PART" {
        return Ok(false);
    }
    let le32 = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
    let entries_lba = u64::from_le_bytes(header[72..80].try_into().expect("8 bytes"));
    let (count, entry_size) = (le32(80).min(MAX_GPT_ENTRIES), le32(84) as usize);
    if entry_size < 16 {
        return Ok(false);
    }
    let mut entries = vec![0u8; count as usize * entry_size];
    disk.read_exact_at(&mut entries, entries_lba * SECTOR)?;
    Ok(entries.chunks(entry_size).any(|entry| entry[..16] == GPT_ESP))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk_with(write: impl FnOnce(&mut Vec<u8>)) -> tempfile::NamedTempFile {
        let mut bytes = vec![0u8; 64 << 10];
        bytes[510] = 0x55;
        bytes[511] = 0xaa;
        write(&mut bytes);
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), bytes).unwrap();
        file
    }

    fn gpt(esp: bool) -> tempfile::NamedTempFile {
        disk_with(|bytes| {
            bytes[446 + 4] = MBR_GPT;
            bytes[512..520].copy_from_slice(b"EFI PART");
            bytes[512 + 72..512 + 80].copy_from_slice(&2u64.to_le_bytes());
            bytes[512 + 80..512 + 84].copy_from_slice(&128u32.to_le_bytes());
            bytes[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
            // Partition 1 a BIOS boot partition, partition 2 the ESP (or Linux data).
            bytes[1024..1040].copy_from_slice(b"Hah!IdontNeedEFI");
            if esp {
                bytes[1152..1168].copy_from_slice(&GPT_ESP);
            } else {
                bytes[1152] = 0xaf;
            }
        })
    }

    #[test]
    fn finds_the_esp_of_gpt_and_mbr_disks() {
        assert!(has_efi_system_partition(gpt(true).path()).unwrap());
        assert!(!has_efi_system_partition(gpt(false).path()).unwrap());
        let mbr_esp = disk_with(|bytes| bytes[446 + 16 + 4] = MBR_ESP);
        assert!(has_efi_system_partition(mbr_esp.path()).unwrap());
        let mbr_linux = disk_with(|bytes| bytes[446 + 4] = 0x83);
        assert!(!has_efi_system_partition(mbr_linux.path()).unwrap());
    }

    #[test]
    fn a_boot_loader_without_an_esp_means_bios() {
        assert_eq!(boot_firmware(gpt(true).path()).unwrap(), Some(BootFirmware::Uefi));
        let loader = |esp: bool| {
            let disk = if esp { gpt(true) } else { gpt(false) };
            let mut bytes = std::fs::read(disk.path()).unwrap();
            bytes[..3].copy_from_slice(&[0xeb, 0x63, 0x90]);
            std::fs::write(disk.path(), bytes).unwrap();
            disk
        };
        assert_eq!(boot_firmware(loader(false).path()).unwrap(), Some(BootFirmware::Bios));
        assert_eq!(boot_firmware(loader(true).path()).unwrap(), Some(BootFirmware::Uefi));
        assert_eq!(boot_firmware(gpt(false).path()).unwrap(), None);
    }
}
