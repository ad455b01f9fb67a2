//! MSI-X: the vector table and pending-bit array a driver programs, and delivery of each vector
//! through its own irqfd. Masked vectors latch a pending bit and fire when unmasked.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

pub const ENTRY_SIZE: u64 = 16;
const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_MASKED: u32 = 1;

/// Programs where a vector's message goes: the VMM backs this with KVM GSI routing.
pub trait MsiRouting: Send + Sync {
    /// Routes `gsi` to the MSI message (`address`, `data`).
    fn route(&self, gsi: u32, address: u64, data: u32);
}

#[derive(Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
struct Entry {
    address_lo: u32,
    address_hi: u32,
    data: u32,
    control: u32,
}

/// One vector: the GSI and irqfd the VMM gave it.
pub struct Vector {
    pub gsi: u32,
    pub irqfd: EventFd,
}

pub struct MsixState {
    entries: Vec<Entry>,
    pending: Vec<bool>,
    vectors: Vec<Vector>,
    enabled: bool,
    function_masked: bool,
    routing: Arc<dyn MsiRouting>,
}

#[derive(serde::Serialize, serde::Deserialize)]
pub struct MsixSnapshot {
    entries: Vec<Entry>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
}

pub type SharedMsix = Arc<Mutex<MsixState>>;

impl MsixState {
    pub fn new(vectors: Vec<Vector>, routing: Arc<dyn MsiRouting>) -> SharedMsix {
        let n = vectors.len();
        Arc::new(Mutex::new(MsixState {
            entries: vec![Entry { control: VECTOR_MASKED, ..Default::default() }; n],
            pending: vec![false; n],
            vectors,
            enabled: false,
            function_masked: false,
            routing,
        }))
    }

    pub fn vector_count(&self) -> u16 {
        self.entries.len() as u16
    }

    /// The capability's message-control word.
    pub fn control(&self) -> u16 {
        let mut control = self.vector_count() - 1;
        if self.enabled {
            control |= CONTROL_ENABLE;
        }
        if self.function_masked {
            control |= CONTROL_FUNCTION_MASK;
        }
        control
    }

    pub fn set_control(&mut self, control: u16) {
        self.enabled = control & CONTROL_ENABLE != 0;
        self.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        for vector in 0..self.entries.len() {
            self.deliver_pending(vector);
        }
    }

    fn masked(&self, vector: usize) -> bool {
        !self.enabled || self.function_masked || self.entries[vector].control & VECTOR_MASKED != 0
    }

    fn deliver_pending(&mut self, vector: usize) {
        if self.pending[vector] && !self.masked(vector) {
            self.pending[vector] = false;
            let _ = self.vectors[vector].irqfd.write(1);
        }
    }

    /// Raises `vector`, or latches it while masked. Out-of-range vectors (a driver-chosen
    /// number) are ignored.
    pub fn signal(&mut self, vector: u16) {
        let vector = usize::from(vector);
        if vector >= self.entries.len() {
            return;
        }
        if self.masked(vector) {
            self.pending[vector] = true;
        } else {
            let _ = self.vectors[vector].irqfd.write(1);
        }
    }

    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let (vector, field) = ((offset / ENTRY_SIZE) as usize, (offset % ENTRY_SIZE) / 4);
        let Some(entry) = self.entries.get(vector) else { return };
        let value = [entry.address_lo, entry.address_hi, entry.data, entry.control][field as usize];
        let bytes = value.to_le_bytes();
        let start = (offset % 4) as usize;
        let n = data.len().min(4 - start);
        data[..n].copy_from_slice(&bytes[start..start + n]);
    }

    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        // Drivers write whole 32-bit fields (or 64-bit pairs); anything else is ignored.
        if !offset.is_multiple_of(4) || (data.len() != 4 && data.len() != 8) {
            return;
        }
        for (i, word) in data.chunks_exact(4).enumerate() {
            let offset = offset + 4 * i as u64;
            let (vector, field) = ((offset / ENTRY_SIZE) as usize, (offset % ENTRY_SIZE) / 4);
            let Some(entry) = self.entries.get_mut(vector) else { return };
            let value = u32::from_le_bytes(word.try_into().unwrap());
            match field {
                0 => entry.address_lo = value,
                1 => entry.address_hi = value,
                2 => entry.data = value,
                _ => entry.control = value & VECTOR_MASKED,
            }
            let entry = *entry;
            let address = (u64::from(entry.address_hi) << 32) | u64::from(entry.address_lo);
            self.routing.route(self.vectors[vector].gsi, address, entry.data);
            self.deliver_pending(vector);
        }
    }

    /// The table, pending bits and control, for a snapshot.
    pub fn save(&self) -> MsixSnapshot {
        MsixSnapshot {
            entries: self.entries.clone(),
            pending: self.pending.clone(),
            enabled: self.enabled,
            function_masked: self.function_masked,
        }
    }

    /// Takes back a saved table and routes every vector as it was.
    pub fn restore(&mut self, saved: MsixSnapshot) -> Result<(), String> {
        if saved.entries.len() != self.entries.len() || saved.pending.len() != self.pending.len() {
            return Err(format!("{} MSI-X vectors saved, the device has {}", saved.entries.len(), self.entries.len()));
        }
        (self.entries, self.pending) = (saved.entries, saved.pending);
        (self.enabled, self.function_masked) = (saved.enabled, saved.function_masked);
        for (entry, vector) in self.entries.iter().zip(&self.vectors) {
            let address = (u64::from(entry.address_hi) << 32) | u64::from(entry.address_lo);
            if address != 0 {
                self.routing.route(vector.gsi, address, entry.data);
            }
        }
        Ok(())
    }

    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        for (i, byte) in data.iter_mut().enumerate() {
            for bit in 0..8 {
                let vector = ((offset as usize + i) * 8) + bit;
                if self.pending.get(vector).copied().unwrap_or(false) {
                    *byte |= 1 << bit;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Routes(Mutex<Vec<(u32, u64, u32)>>);
    impl MsiRouting for Routes {
        fn route(&self, gsi: u32, address: u64, data: u32) {
            self.0.lock().unwrap().push((gsi, address, data));
        }
    }

    fn msix(n: u32) -> (SharedMsix, Vec<EventFd>, Arc<Routes>) {
        let fds: Vec<EventFd> = (0..n).map(|_| crate::host::eventfd().unwrap()).collect();
        let vectors =
            fds.iter().enumerate().map(|(i, f)| Vector { gsi: 24 + i as u32, irqfd: f.try_clone().unwrap() }).collect();
        let routes = Arc::new(Routes::default());
        (MsixState::new(vectors, routes.clone()), fds, routes)
    }

    #[test]
    fn programming_a_vector_routes_its_gsi() {
        let (m, _, routes) = msix(2);
        let mut m = m.lock().unwrap();
        m.write_table(16, &0xfee0_0000u32.to_le_bytes());
        m.write_table(24, &0x41u32.to_le_bytes());
        assert_eq!(routes.0.lock().unwrap().last(), Some(&(25, 0xfee0_0000, 0x41)));
        let mut data = [0u8; 4];
        m.read_table(24, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x41);
        assert_eq!(m.control(), 1, "table size - 1");
    }

    #[test]
    fn masked_vectors_latch_and_fire_on_unmask() {
        let (m, fds, _) = msix(2);
        let mut m = m.lock().unwrap();
        m.signal(0);
        assert!(fds[0].read().is_err(), "disabled MSI-X delivers nothing");
        let mut pba = [0u8; 1];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 1);
        m.set_control(CONTROL_ENABLE);
        assert!(fds[0].read().is_err(), "vector 0 is still masked");
        m.write_table(12, &0u32.to_le_bytes()); // unmask vector 0
        assert_eq!(fds[0].read().unwrap(), 1);
        m.signal(0);
        assert_eq!(fds[0].read().unwrap(), 1);
        m.signal(7); // no such vector: ignored
    }
}
