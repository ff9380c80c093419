package network

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"time"

	bolt "go.etcd.io/bbolt"
)

// SchemaVersion is the version of the lease database layout that this code
// writes. Opening a database with a newer version fails, so an old binary
// never rewrites a layout it does not know.
const SchemaVersion = 1

var (
	bucketMeta   = []byte("meta")
	bucketLeases = []byte("leases")
	keySchema    = []byte("schema")
)

// Errors of the lease store.
var (
	ErrLeaseNotFound = errors.New("lease not found")
	ErrSchemaVersion = errors.New("unsupported lease database schema")
)

// Store persists leases in a bbolt database file. Every change is one bbolt
// transaction, which is written to disk with fsync before it returns, so a
// crash keeps either the old or the new leases, never a mix.
type Store struct {
	db *bolt.DB
}

// OpenStore opens or creates the lease database at path. It fails after a
// timeout when another process holds the file's lock.
func OpenStore(path string) (*Store, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 5 * time.Second})
	if err != nil {
		return nil, fmt.Errorf("open lease store %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		meta, err := tx.CreateBucketIfNotExists(bucketMeta)
		if err != nil {
			return err
		}
		if _, err := tx.CreateBucketIfNotExists(bucketLeases); err != nil {
			return err
		}
		v := meta.Get(keySchema)
		if v == nil {
			return meta.Put(keySchema, []byte(strconv.Itoa(SchemaVersion)))
		}
		got, err := strconv.Atoi(string(v))
		if err != nil || got > SchemaVersion || got < 1 {
			return fmt.Errorf("%w: file has version %q, this build reads up to %d", ErrSchemaVersion, v, SchemaVersion)
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("open lease store %s: %w", path, err)
	}
	return &Store{db: db}, nil
}

// Close closes the database.
func (s *Store) Close() error { return s.db.Close() }

// Get returns the lease of VM vmID, or an error matching ErrLeaseNotFound.
func (s *Store) Get(vmID string) (Lease, error) {
	var l Lease
	err := s.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketLeases).Get([]byte(vmID))
		if v == nil {
			return fmt.Errorf("get lease of vm %s: %w", vmID, ErrLeaseNotFound)
		}
		return json.Unmarshal(v, &l)
	})
	return l, err
}

// List returns every lease, ordered by VM id.
func (s *Store) List() ([]Lease, error) {
	var out []Lease
	err := s.db.View(func(tx *bolt.Tx) error {
		var err error
		out, err = readAll(tx)
		return err
	})
	return out, err
}

func readAll(tx *bolt.Tx) ([]Lease, error) {
	var out []Lease
	err := tx.Bucket(bucketLeases).ForEach(func(k, v []byte) error {
		var l Lease
		if err := json.Unmarshal(v, &l); err != nil {
			return fmt.Errorf("decode lease of vm %s: %w", k, err)
		}
		out = append(out, l)
		return nil
	})
	return out, err
}

// Update runs fn with every current lease and applies the leases it
// returns to put and the VM ids to delete, all in one transaction. An error
// from fn changes nothing.
func (s *Store) Update(fn func(leases []Lease) (put []Lease, del []string, err error)) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		leases, err := readAll(tx)
		if err != nil {
			return err
		}
		put, del, err := fn(slices.Clone(leases))
		if err != nil {
			return err
		}
		b := tx.Bucket(bucketLeases)
		for _, id := range del {
			if err := b.Delete([]byte(id)); err != nil {
				return err
			}
		}
		for _, l := range put {
			v, err := json.Marshal(l)
			if err != nil {
				return err
			}
			if err := b.Put([]byte(l.VMID), v); err != nil {
				return err
			}
		}
		return nil
	})
}

// Delete removes the lease of vmID; a missing lease is not an error.
func (s *Store) Delete(vmID string) error {
	return s.Update(func([]Lease) ([]Lease, []string, error) { return nil, []string{vmID}, nil })
}
