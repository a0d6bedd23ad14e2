package daemon_test

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
)

// The floor: what a gRPC call costs with nothing of keywardd in it, served
// in the same process and run as keywardd's benchmarks, so that every
// target is stated against what the machine can do at that moment. Two
// bare grpc-go servers on a Unix socket answer keyward.v1's Ping: one does
// nothing (the transport alone), the other appends a line of about 300
// bytes to a file and answers once it is fsynced, one fsync serving every
// line that arrived while the last one ran (group commit). The second is
// what a call costs that must be on disk before it is answered, which
// keywardd promises for every call.

// floorServer is the bare server; durable, if set, is written to first.
type floorServer struct {
	keywardv1.UnimplementedStatusServiceServer
	durable *groupLog
}

func (f *floorServer) Ping(ctx context.Context, _ *keywardv1.PingRequest) (*keywardv1.PingResponse, error) {
	if f.durable != nil {
		if err := f.durable.append(floorLine); err != nil {
			return nil, err
		}
	}
	return &keywardv1.PingResponse{}, nil
}

// floorLine is about as long as an audit record of a call.
var floorLine = []byte(`{"seq":1,"prev":"0000000000000000000000000000000000000000000000000000000000000000","kind":"record","body":{"time":"2026-12-04T00:00:00Z","caller":{"uid":1000,"gid":1000,"pid":4242},"op":"StatusService.Ping","outcome":"ok"},"hash":"0000000000000000000000000000000000000000000000000000000000000000"}` + "\n")

// groupLog appends lines to a file: a writer goroutine takes every line
// waiting, writes them with one write and one fsync, and answers them.
type groupLog struct {
	f    *os.File
	reqs chan groupReq
}

type groupReq struct {
	line []byte
	done chan error
}

func newGroupLog(path string) (*groupLog, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	g := &groupLog{f: f, reqs: make(chan groupReq, 1024)}
	go g.writer()
	return g, nil
}

func (g *groupLog) append(line []byte) error {
	done := make(chan error, 1)
	g.reqs <- groupReq{line, done}
	return <-done
}

func (g *groupLog) writer() {
	var buf []byte
	for r, ok := <-g.reqs; ok; r, ok = <-g.reqs {
		batch := []groupReq{r}
	more:
		for {
			select {
			case r, ok := <-g.reqs:
				if !ok {
					break more
				}
				batch = append(batch, r)
			default:
				break more
			}
		}
		buf = buf[:0]
		for _, r := range batch {
			buf = append(buf, r.line...)
		}
		_, err := g.f.Write(buf)
		if err == nil {
			err = g.f.Sync()
		}
		for _, r := range batch {
			r.done <- err
		}
	}
	g.f.Close()
}

// startFloor serves the bare server on a Unix socket in a temporary
// directory (durable: with the group-committed log in it) and returns a
// client connection; both stop when b ends.
func startFloor(b testing.TB, durable bool) *grpc.ClientConn {
	b.Helper()
	dir := b.TempDir()
	fs := &floorServer{}
	if durable {
		g, err := newGroupLog(filepath.Join(dir, "log"))
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { close(g.reqs) })
		fs.durable = g
	}
	sock := filepath.Join(dir, "floor.sock")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		b.Fatal(err)
	}
	gs := grpc.NewServer()
	keywardv1.RegisterStatusServiceServer(gs, fs)
	go gs.Serve(lis)
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { conn.Close(); gs.Stop() })
	return conn
}
