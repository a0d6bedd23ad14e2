package store

// The structural check of a store file, before bbolt maps it.
//
// bbolt keeps no checksum on data pages and trusts every page id, count,
// offset and length it reads from the file. A damaged file therefore makes
// it read past its map (SIGBUS or SIGSEGV: a fatal error that Go cannot
// recover), follow a cycle of pages (a stack overflow, also fatal), allocate
// by a damaged count, or panic in a goroutine of its own (Tx.Check). No
// library checks a bbolt file without trusting it, so this one is written
// here: it reads the file with plain reads, never through a map, and checks
// every bound bbolt relies on, iteratively, with each page visited at most
// once. It follows bbolt's file format version 2
// (go.etcd.io/bbolt/internal/common), which bbolt keeps stable, and checks
// no more than bbolt's own Tx.Check does, so a file bbolt wrote passes.

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"os"
	"slices"

	"golang.org/x/sys/unix"
)

const (
	boltMagic      = 0xED0CDAED
	boltVersion    = 2
	pageHeaderSize = 16 // id u64, flags u16, count u16, overflow u32
	elemSize       = 16 // a branch or leaf element
	bucketHeader   = 16 // root pgid u64, sequence u64
	metaChecksumAt = 56 // the meta's bytes before its checksum
	noFreelist     = ^uint64(0)

	branchPage   = 0x01
	leafPage     = 0x02
	metaPage     = 0x04
	freelistPage = 0x10
	bucketLeaf   = 0x01
)

var le = binary.NativeEndian // bbolt writes its structures in the host's byte order

// boltMeta is what a meta page says.
type boltMeta struct {
	pageSize uint32
	root     uint64 // the root bucket's root page
	freelist uint64
	pgid     uint64 // the high-water mark: pages [0, pgid) are in use
	txid     uint64
}

// parseMeta reads the meta in page (a page's bytes from its start) and
// checks it as bbolt does: magic, version and checksum, nothing more.
func parseMeta(page []byte) (boltMeta, error) {
	if len(page) < pageHeaderSize+metaChecksumAt+8 {
		return boltMeta{}, errors.New("too short for a meta page")
	}
	m := page[pageHeaderSize:]
	if le.Uint32(m) != boltMagic {
		return boltMeta{}, errors.New("not a bbolt meta page (bad magic)")
	}
	if v := le.Uint32(m[4:]); v != boltVersion {
		return boltMeta{}, fmt.Errorf("bbolt format version %d, not %d", v, boltVersion)
	}
	h := fnv.New64a()
	h.Write(m[:metaChecksumAt])
	if h.Sum64() != le.Uint64(m[metaChecksumAt:]) {
		return boltMeta{}, errors.New("its checksum does not match")
	}
	return boltMeta{pageSize: le.Uint32(m[8:]), root: le.Uint64(m[16:]), freelist: le.Uint64(m[32:]),
		pgid: le.Uint64(m[40:]), txid: le.Uint64(m[48:])}, nil
}

// boltPageSize is the page size bbolt will use for the file, found as
// bbolt finds it (DB.getPageSize): the first meta page's if it is valid,
// else that of the first valid meta at 1 KiB, 2 KiB, ... 16 MiB, else, if
// either place could be read, the system's.
func boltPageSize(f *os.File, size int64) (int64, error) {
	buf := make([]byte, 4096)
	first := false
	if n, err := f.ReadAt(buf, 0); err == nil && n == len(buf) {
		first = true
		if m, err := parseMeta(buf); err == nil {
			return int64(m.pageSize), nil
		}
	}
	second := false
	for i := range 15 {
		pos := int64(1024) << i
		if pos >= size-1024 {
			break
		}
		n, err := f.ReadAt(buf, pos)
		if (err == nil && n == len(buf)) || (errors.Is(err, io.EOF) && int64(n) == size-pos) {
			second = true
			if m, err := parseMeta(buf[:n]); err == nil {
				return int64(m.pageSize), nil
			}
		}
	}
	if first || second {
		return int64(os.Getpagesize()), nil
	}
	return 0, errors.New("neither meta page can be read")
}

// fileReport is what checkFile found in a sound file.
type fileReport struct {
	// metaDamaged says why the other meta page was not valid, if it was
	// not. On its own that is no damage (a crash while bbolt wrote it, for
	// a transaction never acknowledged), but if that transaction was
	// acknowledged, its loss shows as a rollback: this says why.
	metaDamaged string
	// id is the file as it was read, and changed says it was written
	// during the walk: what bbolt then opened is what was checked only if
	// it is still the same file, unchanged (same).
	id      fileStamp
	changed bool
	// txid is the transaction of the meta page the walk followed, which
	// bbolt must serve.
	txid uint64
}

// fileStamp tells a file and its content apart from another's: device,
// inode, size and the time of its last change (a write moves it, but only
// to the clock's current tick: checkPath waits for the tick to pass).
type fileStamp struct {
	dev, ino uint64
	size     int64
	ctime    unix.Timespec
}

func fileID(f *os.File) (fileStamp, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return fileStamp{}, err
	}
	return fileStamp{dev: uint64(st.Dev), ino: st.Ino, size: st.Size, ctime: st.Ctim}, nil
}

// same says whether f (bbolt's) is the file walked, unchanged since.
func (r fileReport) same(f *os.File) bool {
	if f == nil || r.changed || r.id == (fileStamp{}) {
		return false
	}
	id, err := fileID(f)
	return err == nil && id == r.id
}

// checkFile checks the structure of the bbolt file f: the page size and
// both meta pages chosen exactly as bbolt chooses them, the size against
// the pages in use, the freelist, and every page of every bucket's tree
// (ids, types, counts, element bounds, key order, each page reached once
// and none both reached and free, none lost). A problem is returned as
// ErrDamaged with what was found.
func checkFile(f *os.File, v visitor) (fileReport, error) {
	fi, err := f.Stat()
	if err != nil {
		return fileReport{}, err
	}
	size := fi.Size()
	damaged := func(format string, a ...any) (fileReport, error) {
		return fileReport{}, fmt.Errorf("%w: %s", ErrDamaged, fmt.Sprintf(format, a...))
	}
	pageSize, err := boltPageSize(f, size)
	if err != nil {
		return damaged("%d bytes long: %v", size, err)
	}
	// keywardd makes its stores with the system's page size; bbolt would
	// find another only in a damaged or crafted file.
	if pageSize != int64(os.Getpagesize()) {
		return damaged("a page size of %d bytes, not this system's %d", pageSize, os.Getpagesize())
	}
	var metas [2]boltMeta
	var errs [2]error
	for i := range metas {
		page := make([]byte, pageHeaderSize+metaChecksumAt+8)
		if _, err := f.ReadAt(page, int64(i)*pageSize); err != nil {
			errs[i] = errors.New("the file ends before it")
			continue
		}
		if metas[i], errs[i] = parseMeta(page); errs[i] != nil {
			continue
		}
		// bbolt does not look at a meta page's header; a valid meta in a
		// page that calls itself something else was not written by bbolt.
		if id, flags := le.Uint64(page), le.Uint16(page[8:]); id != uint64(i) || flags != metaPage {
			return damaged("meta page %d is valid but its page header says page %d, flags %#x", i, id, flags)
		}
		if int64(metas[i].pageSize) != pageSize {
			return damaged("meta page %d says pages are %d bytes, the file's are %d", i, metas[i].pageSize, pageSize)
		}
	}
	var m boltMeta
	var rep fileReport
	switch {
	case errs[0] != nil && errs[1] != nil:
		return damaged("both meta pages are damaged (%v; %v)", errs[0], errs[1])
	case errs[0] != nil:
		m, rep.metaDamaged = metas[1], "meta page 0: "+errs[0].Error()
	case errs[1] != nil:
		m, rep.metaDamaged = metas[0], "meta page 1: "+errs[1].Error()
	case metas[1].txid > metas[0].txid:
		m = metas[1]
	default:
		m = metas[0]
	}
	rep.txid = m.txid
	pages := uint64(size / pageSize)
	switch {
	case m.pgid < 4 || m.pgid > pages:
		return damaged("%d bytes hold %d pages of %d bytes, but the meta page says %d are in use: the file was cut short or its meta page is wrong", size, pages, pageSize, m.pgid)
	case m.root < 2 || m.root >= m.pgid:
		return damaged("the root page %d is outside the %d pages in use", m.root, m.pgid)
	case m.freelist == noFreelist:
		return damaged("no freelist, which keywardd always keeps")
	case m.freelist < 2 || m.freelist >= m.pgid:
		return damaged("the freelist page %d is outside the %d pages in use", m.freelist, m.pgid)
	}
	c := &checker{f: f, pageSize: pageSize, hwm: m.pgid, seen: make([]bool, m.pgid), freed: make([]bool, m.pgid), visit: v}
	c.seen[0], c.seen[1] = true, true
	if err := c.freelist(m.freelist); err != nil {
		return damaged("%v", err)
	}
	if err := c.tree(m.root); err != nil {
		return damaged("%v", err)
	}
	for id := uint64(2); id < m.pgid; id++ {
		if !c.seen[id] && !c.freed[id] {
			return damaged("page %d is neither in use nor free", id)
		}
	}
	return rep, nil
}

// checker walks the pages of one file.
type checker struct {
	f          *os.File
	pageSize   int64
	hwm        uint64
	seen       []bool // reached from a meta page
	freed      []bool // listed in the freelist
	visit      visitor
	ahead      map[uint64][]byte // first pages read ahead (readAhead), by id
	aheadBytes int64             // their size, at most readAheadMost
}

// How much readAhead reads at once, and holds at most.
const (
	readAheadRun  = 1 << 20
	readAheadMost = 4 << 20
)

// visitor is shown, as the walk reads them, the top-level buckets, the
// records in them, and any bucket inside one: what the store's check of
// its content needs, read here with the same plain reads rather than
// through bbolt's map, where each page's first touch is a page fault and
// stays in the process's memory. A visitor keeps what it finds wrong
// itself: the walk checks structure only.
type visitor interface {
	bucket(name []byte, seq uint64)
	record(bucket, key, val []byte)
	nested(bucket, key []byte)
}

// readAhead reads the first pages of a branch's children that lie next to
// each other in the file with one read per run, for read to take: bbolt
// mostly writes a branch's children side by side, and a read a page costs
// as much in system calls as checking it does in MACs. What is read ahead
// is checked by read like any page.
func (c *checker) readAhead(kids []pending) {
	most := max(1, int(readAheadRun/c.pageSize)) // pages a read
	ids := make([]uint64, 0, len(kids))
	for _, k := range kids {
		if k.id >= 2 && k.id < c.hwm && !c.seen[k.id] {
			ids = append(ids, k.id)
		}
	}
	slices.Sort(ids)
	ids = slices.Compact(ids)
	if c.ahead == nil {
		c.ahead = map[uint64][]byte{}
	}
	for i := 0; i < len(ids); {
		j := i + 1
		for j < len(ids) && ids[j] == ids[j-1]+1 && j-i < most {
			j++
		}
		if n := int64(j-i) * c.pageSize; j-i > 1 && c.aheadBytes+n <= readAheadMost {
			c.aheadBytes += n
			buf := make([]byte, n)
			if _, err := c.f.ReadAt(buf, int64(ids[i])*c.pageSize); err == nil {
				for k := i; k < j; k++ {
					at := int64(k-i) * c.pageSize
					c.ahead[ids[k]] = buf[at : at+c.pageSize : at+c.pageSize]
				}
			}
		}
		i = j
	}
}

// read reads page id and its overflow pages, checking its header.
func (c *checker) read(id uint64) ([]byte, uint16, error) {
	if id < 2 || id >= c.hwm {
		return nil, 0, fmt.Errorf("a reference to page %d, outside the %d pages in use", id, c.hwm)
	}
	// The first page whole (read ahead with its neighbours, or now), and
	// the overflow after it once its count is checked.
	head, ok := c.ahead[id]
	if ok {
		delete(c.ahead, id)
		c.aheadBytes -= c.pageSize
	} else {
		head = make([]byte, c.pageSize)
		if _, err := c.f.ReadAt(head, int64(id)*c.pageSize); err != nil {
			return nil, 0, fmt.Errorf("page %d: %v", id, err)
		}
	}
	if got := le.Uint64(head); got != id {
		return nil, 0, fmt.Errorf("page %d calls itself page %d", id, got)
	}
	overflow := uint64(le.Uint32(head[12:]))
	if overflow >= c.hwm-id {
		return nil, 0, fmt.Errorf("page %d runs over %d more pages, past the %d in use", id, overflow, c.hwm)
	}
	for i := id; i <= id+overflow; i++ {
		if c.seen[i] {
			return nil, 0, fmt.Errorf("page %d is reached twice", i)
		}
		if c.freed[i] {
			return nil, 0, fmt.Errorf("page %d is in use and free", i)
		}
		c.seen[i] = true
	}
	buf := head
	if overflow > 0 {
		buf = make([]byte, int64(overflow+1)*c.pageSize)
		copy(buf, head)
		if _, err := c.f.ReadAt(buf[c.pageSize:], int64(id+1)*c.pageSize); err != nil {
			return nil, 0, fmt.Errorf("page %d: %v", id, err)
		}
	}
	return buf, le.Uint16(head[8:]), nil
}

func (c *checker) freelist(id uint64) error {
	buf, flags, err := c.read(id)
	if err != nil {
		return err
	}
	if flags != freelistPage {
		return fmt.Errorf("the freelist page %d is not a freelist page (flags %#x)", id, flags)
	}
	count, at := uint64(le.Uint16(buf[10:])), pageHeaderSize
	if count == 0xFFFF {
		count, at = le.Uint64(buf[pageHeaderSize:]), pageHeaderSize+8
	}
	if count > uint64(len(buf)-at)/8 {
		return fmt.Errorf("the freelist says it holds %d pages, more than its page can", count)
	}
	for i := uint64(0); i < count; i++ {
		free := le.Uint64(buf[at+int(i)*8:])
		switch {
		case free < 2 || free >= c.hwm:
			return fmt.Errorf("the freelist holds page %d, outside the %d pages in use", free, c.hwm)
		case c.freed[free]:
			return fmt.Errorf("page %d is freed twice", free)
		case c.seen[free]:
			return fmt.Errorf("page %d is in use and free", free)
		}
		c.freed[free] = true
	}
	return nil
}

// pending is a page still to check, with the range its keys must be in:
// [min, max), nil for no bound.
type pending struct {
	id       uint64
	min, max []byte
	top      bool   // a page of the root bucket: every element is a bucket
	bucket   []byte // the top-level bucket the page is in, for the visitor; nil: the root's, or a nested bucket's
	// child: a page a branch points to, whose first key must be the
	// branch's key for it (min). bbolt writes it so every time it writes
	// the page, and finds the page in its parent by that key when it writes
	// it again: a branch key that is not its child's first key makes bbolt
	// corrupt its own tree on the next write.
	child bool
}

// tree checks every page reached from the root bucket's root page.
func (c *checker) tree(root uint64) error {
	stack := []pending{{id: root, top: true}}
	for len(stack) > 0 {
		p := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		buf, flags, err := c.read(p.id)
		if err != nil {
			return err
		}
		if p.child {
			if err := firstKey(buf, p.min); err != nil {
				return fmt.Errorf("page %d: %v", p.id, err)
			}
		}
		switch flags {
		case branchPage:
			kids, err := branchElems(buf, p)
			if err != nil {
				return fmt.Errorf("branch page %d: %v", p.id, err)
			}
			c.readAhead(kids)
			stack = append(stack, kids...)
		case leafPage:
			roots, err := leafElems(buf, p.min, p.max, p.top, true, p.bucket, c.visit)
			if err != nil {
				return fmt.Errorf("leaf page %d: %v", p.id, err)
			}
			stack = append(stack, roots...)
		default:
			return fmt.Errorf("page %d in a bucket's tree is not a branch or leaf page (flags %#x)", p.id, flags)
		}
	}
	return nil
}

// firstKey checks that the page in buf (a branch's child) is not empty and
// that its first key is want. Element bounds are checked by the caller.
func firstKey(buf, want []byte) error {
	n, err := elems(buf)
	if err != nil {
		return err
	}
	if n == 0 {
		return errors.New("an empty page below a branch")
	}
	at := uint64(pageHeaderSize)
	pos, ksize := uint64(le.Uint32(buf[at+4:])), uint64(le.Uint32(buf[at+8:])) // a leaf element
	if le.Uint16(buf[8:]) == branchPage {
		pos, ksize = uint64(le.Uint32(buf[at:])), uint64(le.Uint32(buf[at+4:]))
	}
	key, err := span(buf, pageHeaderSize+n*elemSize, at+pos, ksize)
	if err != nil {
		return err
	}
	if !bytes.Equal(key, want) {
		return errors.New("its first key is not its branch's key for it")
	}
	return nil
}

// elems returns the count of a page's elements and checks they fit.
func elems(buf []byte) (int, error) {
	if len(buf) < pageHeaderSize {
		return 0, errors.New("shorter than a page header")
	}
	n := int(le.Uint16(buf[10:]))
	if pageHeaderSize+n*elemSize > len(buf) {
		return 0, fmt.Errorf("%d elements do not fit", n)
	}
	return n, nil
}

// span returns buf[from:from+n] if it lies in the data after the elements.
func span(buf []byte, dataStart int, from, n uint64) ([]byte, error) {
	if from < uint64(dataStart) || n > uint64(len(buf)) || from > uint64(len(buf))-n {
		return nil, errors.New("an element points outside its page")
	}
	return buf[from : from+n], nil
}

// inOrder checks key against the one before it and the page's range.
func inOrder(i int, key, prev, min, max []byte) error {
	switch {
	case len(key) == 0:
		return fmt.Errorf("element %d has an empty key", i)
	case i == 0 && min != nil && bytes.Compare(min, key) > 0,
		i > 0 && bytes.Compare(prev, key) >= 0,
		max != nil && bytes.Compare(key, max) >= 0:
		return fmt.Errorf("element %d's key is out of order", i)
	}
	return nil
}

func branchElems(buf []byte, p pending) ([]pending, error) {
	n, err := elems(buf)
	if err != nil {
		return nil, err
	}
	if n == 0 {
		return nil, errors.New("no elements")
	}
	data := pageHeaderSize + n*elemSize
	keys := make([][]byte, n)
	ids := make([]uint64, n)
	for i := range n {
		e := buf[pageHeaderSize+i*elemSize:]
		at := uint64(pageHeaderSize + i*elemSize)
		key, err := span(buf, data, at+uint64(le.Uint32(e)), uint64(le.Uint32(e[4:])))
		if err != nil {
			return nil, err
		}
		var prev []byte
		if i > 0 {
			prev = keys[i-1]
		}
		if err := inOrder(i, key, prev, p.min, p.max); err != nil {
			return nil, err
		}
		keys[i], ids[i] = key, le.Uint64(e[8:])
	}
	out := make([]pending, n)
	for i := range n {
		max := p.max
		if i+1 < n {
			max = keys[i+1]
		}
		out[i] = pending{id: ids[i], min: bytes.Clone(keys[i]), max: bytes.Clone(max), top: p.top, child: true, bucket: p.bucket}
	}
	return out, nil
}

// leafElems checks a leaf page (or a bucket's inline page) and returns the
// root pages of the buckets it holds. top: every element must be a bucket;
// nested: buckets may be held (inline pages hold none). bucket, if not nil,
// is the top-level bucket the page is in: its records and buckets are
// shown to v (if not nil), as are the buckets of a top page.
func leafElems(buf []byte, min, max []byte, top, nested bool, bucket []byte, v visitor) ([]pending, error) {
	n, err := elems(buf)
	if err != nil {
		return nil, err
	}
	data := pageHeaderSize + n*elemSize
	var roots []pending
	var prev []byte
	for i := range n {
		e := buf[pageHeaderSize+i*elemSize:]
		at := uint64(pageHeaderSize + i*elemSize)
		flags, ksize, vsize := le.Uint32(e), uint64(le.Uint32(e[8:])), uint64(le.Uint32(e[12:]))
		kv, err := span(buf, data, at+uint64(le.Uint32(e[4:])), ksize+vsize)
		if err != nil {
			return nil, err
		}
		key, val := kv[:ksize], kv[ksize:]
		if err := inOrder(i, key, prev, min, max); err != nil {
			return nil, err
		}
		prev = key
		switch {
		case flags&^bucketLeaf != 0:
			return nil, fmt.Errorf("element %d has unknown flags %#x", i, flags)
		case flags == 0 && top:
			return nil, fmt.Errorf("element %d is a record where only buckets belong", i)
		case flags == 0:
			if v != nil && bucket != nil {
				v.record(bucket, key, val)
			}
			continue
		case !nested:
			return nil, fmt.Errorf("element %d is a bucket inside an inline bucket", i)
		case len(val) < bucketHeader:
			return nil, fmt.Errorf("element %d is a bucket with a %d-byte header", i, len(val))
		}
		// A bucket: a top-level one, named by its key, or one inside a
		// top-level bucket, whose content is not shown.
		var in []byte
		switch {
		case top:
			in = key
			if v != nil {
				v.bucket(key, le.Uint64(val[8:]))
			}
		case v != nil && bucket != nil:
			v.nested(bucket, key)
		}
		if root := le.Uint64(val); root != 0 {
			roots = append(roots, pending{id: root, bucket: in})
			continue
		}
		inline := val[bucketHeader:]
		if len(inline) < pageHeaderSize || le.Uint16(inline[8:]) != leafPage {
			return nil, fmt.Errorf("element %d is an inline bucket without a leaf page", i)
		}
		if _, err := leafElems(inline, nil, nil, false, false, in, v); err != nil {
			return nil, fmt.Errorf("element %d's inline bucket: %v", i, err)
		}
	}
	return roots, nil
}
