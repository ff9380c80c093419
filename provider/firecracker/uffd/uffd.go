// Package uffd serves a restored Firecracker VM's guest memory through
// userfaultfd(2).
//
// With the Uffd memory backend, Firecracker maps guest memory without
// content, registers it with a userfaultfd and connects to a Unix socket
// whose path is given in the /snapshot/load request. Over that connection it
// sends one message: a JSON array of the guest memory regions, with the
// userfaultfd attached as SCM_RIGHTS ancillary data. A [Handler] listens on
// that socket, receives both, and then serves every page fault from the
// snapshot's memory file: it copies the page with UFFDIO_COPY, or maps the
// zero page with UFFDIO_ZEROPAGE when the page is a hole in the file or was
// removed by the guest (a UFFD_EVENT_REMOVE, sent when the balloon device
// or madvise(MADV_DONTNEED) discards memory).
//
// Limits: the handler serves one Firecracker process, it reads the memory
// file through a private read-only mapping, and it supports regions whose
// page size is the host's base page size or a huge page size (holes in
// huge-page regions are served by copying zeroes, because UFFDIO_ZEROPAGE
// does not work on hugetlbfs).
package uffd

import (
	"encoding/json"
	"errors"
	"fmt"
)

// Region is one guest memory region as Firecracker describes it: Size bytes
// mapped at BaseHostVirtAddr in Firecracker's address space, whose content
// starts at Offset in the memory file.
type Region struct {
	BaseHostVirtAddr uint64 `json:"base_host_virt_addr"`
	Size             uint64 `json:"size"`
	Offset           uint64 `json:"offset"`
	// PageSize is in bytes. Firecracker 1.7 sends page_size_kib instead;
	// ParseRegions converts it.
	PageSize    uint64 `json:"page_size,omitempty"`
	PageSizeKiB uint64 `json:"page_size_kib,omitempty"`
}

// ErrBadRegions means Firecracker's region message is malformed.
var ErrBadRegions = errors.New("invalid uffd region list")

// ParseRegions decodes and checks Firecracker's region list. Every region
// must have a power-of-two page size, a page-aligned base and size, and no
// overlap with another region.
func ParseRegions(data []byte) ([]Region, error) {
	var regions []Region
	if err := json.Unmarshal(data, &regions); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadRegions, err)
	}
	if len(regions) == 0 {
		return nil, fmt.Errorf("%w: no regions", ErrBadRegions)
	}
	for i := range regions {
		r := &regions[i]
		if r.PageSize == 0 && r.PageSizeKiB != 0 && r.PageSizeKiB < 1<<40 {
			r.PageSize = r.PageSizeKiB << 10
		}
		switch {
		case r.PageSize == 0 || r.PageSize&(r.PageSize-1) != 0:
			return nil, fmt.Errorf("%w: region %d: page size %d is not a power of two", ErrBadRegions, i, r.PageSize)
		case r.Size == 0 || r.Size%r.PageSize != 0:
			return nil, fmt.Errorf("%w: region %d: size %d is not a positive multiple of the page size %d", ErrBadRegions, i, r.Size, r.PageSize)
		case r.BaseHostVirtAddr%r.PageSize != 0:
			return nil, fmt.Errorf("%w: region %d: base %#x is not page aligned", ErrBadRegions, i, r.BaseHostVirtAddr)
		case r.BaseHostVirtAddr+r.Size < r.BaseHostVirtAddr || r.Offset+r.Size < r.Offset:
			return nil, fmt.Errorf("%w: region %d: end overflows", ErrBadRegions, i)
		}
		for j := range i {
			o := regions[j]
			if r.BaseHostVirtAddr < o.BaseHostVirtAddr+o.Size && o.BaseHostVirtAddr < r.BaseHostVirtAddr+r.Size {
				return nil, fmt.Errorf("%w: regions %d and %d overlap", ErrBadRegions, j, i)
			}
		}
	}
	return regions, nil
}

// find returns the region that contains addr.
func find(regions []Region, addr uint64) (Region, bool) {
	for _, r := range regions {
		if addr >= r.BaseHostVirtAddr && addr < r.BaseHostVirtAddr+r.Size {
			return r, true
		}
	}
	return Region{}, false
}
