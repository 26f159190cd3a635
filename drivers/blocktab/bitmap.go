package blocktab

// Bitmap is a sector bitmap: bit k says whether sector k of a block is
// present in this file.
type Bitmap struct {
	B []byte
	// MSBFirst: bit 0 is the most significant bit of byte 0 (VHD);
	// otherwise the least significant (VHDX).
	MSBFirst bool
}

func (m Bitmap) mask(k int64) byte {
	if m.MSBFirst {
		return 0x80 >> (k % 8)
	}
	return 1 << (k % 8)
}

// Test reports bit k.
func (m Bitmap) Test(k int64) bool { return m.B[k/8]&m.mask(k) != 0 }

// Set sets bits [k, k+n).
func (m Bitmap) Set(k, n int64) {
	for ; n > 0; k, n = k+1, n-1 {
		if k%8 == 0 && n >= 8 {
			m.B[k/8] = 0xff
			k, n = k+7, n-7
			continue
		}
		m.B[k/8] |= m.mask(k)
	}
}

// All reports whether bits [k, k+n) are all set.
func (m Bitmap) All(k, n int64) bool { return m.Run(k, n) == n && m.Test(k) }

// Run returns how many bits from k on, at most n (n >= 1), equal bit k.
func (m Bitmap) Run(k, n int64) int64 {
	want := m.Test(k)
	i := int64(1)
	for i < n {
		j := k + i
		if j%8 == 0 && n-i >= 8 {
			b := m.B[j/8]
			if (want && b == 0xff) || (!want && b == 0) {
				i += 8
				continue
			}
		}
		if m.Test(j) != want {
			break
		}
		i++
	}
	return i
}
