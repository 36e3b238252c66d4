package client

// Starts the built gateway for the client tests: `serve --sandbox` on loopback port 0 (the bound
// addresses are read back from the "gateway serving" log line), one registered caller with a
// fresh token, feedback fed by the sandbox's webhook (no poller, so the sandbox sees only the
// requests a test makes), and the embedded sandbox's admin API.

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"
)

type gatewayProcess struct {
	cmd     *exec.Cmd
	grpc    string
	admin   string
	sandbox string
	token   string
}

func randomText(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return base64.RawURLEncoding.EncodeToString(b)
}

func startGateway(binary string, permissions []string) (*gatewayProcess, error) {
	token := randomText(32)
	digest := sha256.Sum256([]byte(token))
	quoted, _ := json.Marshal(permissions)
	callers := strings.Join([]string{
		"[[caller]]",
		`name = "go-client"`,
		fmt.Sprintf(`token_sha256 = ["%s"]`, hex.EncodeToString(digest[:])),
		fmt.Sprintf("permissions = %s", quoted),
	}, "\n")
	webhookSecret := randomText(16)
	cmd := exec.Command(binary, "serve", "--sandbox")
	cmd.Env = append(os.Environ(),
		"CXGW_GRPC_ADDR=127.0.0.1:0",
		"CXGW_ADMIN_ADDR=127.0.0.1:0",
		"CXGW_LOG_FORMAT=json",
		"CXGW_SHUTDOWN_GRACE=5s",
		"CXGW_CALLERS="+callers,
		"CXGW_FEEDBACK_SYNC=false",
		"CXGW_WEBHOOK_SECRET="+webhookSecret,
	)
	cmd.Stderr = os.Stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	g := &gatewayProcess{cmd: cmd, token: token}
	lines := bufio.NewScanner(stdout)
	lines.Buffer(make([]byte, 1<<20), 1<<20)
	var seen []string
	for g.grpc == "" && lines.Scan() {
		seen = append(seen, lines.Text())
		var entry map[string]interface{}
		if json.Unmarshal(lines.Bytes(), &entry) != nil {
			continue
		}
		if s, ok := entry["sandbox"].(string); ok {
			g.sandbox = strings.TrimSuffix(s, "/")
		}
		if entry["message"] == "gateway serving" {
			g.grpc = entry["grpc_addr"].(string)
			g.admin = "http://" + entry["admin_addr"].(string)
		}
	}
	if g.grpc == "" {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		return nil, fmt.Errorf("the gateway exited early:\n%s", strings.Join(seen, "\n"))
	}
	// Keep draining the log so the gateway never blocks on a full pipe.
	go func() { _, _ = io.Copy(io.Discard, stdout) }()
	err = g.sandboxCall("PUT", "/webhook", map[string]interface{}{
		"url":     g.admin + "/webhooks/retently",
		"headers": map[string]string{"x-cx-webhook-secret": webhookSecret},
	}, nil)
	if err != nil {
		g.stop()
		return nil, err
	}
	return g, nil
}

// stop drains the gateway with SIGTERM and returns its exit error (nil for exit code 0).
func (g *gatewayProcess) stop() error {
	_ = g.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- g.cmd.Wait() }()
	select {
	case err := <-done:
		return err
	case <-time.After(30 * time.Second):
		_ = g.cmd.Process.Kill()
		return fmt.Errorf("the gateway did not drain within 30s")
	}
}

// sandboxCall calls the sandbox's admin API (/_sandbox...) and decodes its JSON answer into out.
func (g *gatewayProcess) sandboxCall(method, path string, body interface{}, out interface{}) error {
	var reader io.Reader
	if body != nil {
		encoded, err := json.Marshal(body)
		if err != nil {
			return err
		}
		reader = bytes.NewReader(encoded)
	}
	request, err := http.NewRequest(method, g.sandbox+"/_sandbox"+path, reader)
	if err != nil {
		return err
	}
	if body != nil {
		request.Header.Set("content-type", "application/json")
	}
	response, err := http.DefaultClient.Do(request)
	if err != nil {
		return err
	}
	defer response.Body.Close()
	if response.StatusCode >= 300 {
		return fmt.Errorf("sandbox %s %s: http %d", method, path, response.StatusCode)
	}
	if out == nil {
		return nil
	}
	return json.NewDecoder(response.Body).Decode(out)
}

type sandboxStats struct {
	Requests []struct {
		Route  string `json:"route"`
		Status int    `json:"status"`
		Count  int    `json:"count"`
	} `json:"requests"`
	Faults struct {
		Retently struct {
			Forced429 int `json:"forced429"`
		} `json:"retently"`
	} `json:"faults"`
}

func (s sandboxStats) count(route string, status int) int {
	sum := 0
	for _, r := range s.Requests {
		if r.Route == route && r.Status == status {
			sum += r.Count
		}
	}
	return sum
}

// metric sums a counter of the gateway's Prometheus text over the series with all the labels.
func (g *gatewayProcess) metric(name string, labels map[string]string) (float64, error) {
	response, err := http.Get(g.admin + "/metrics")
	if err != nil {
		return 0, err
	}
	defer response.Body.Close()
	text, err := io.ReadAll(response.Body)
	if err != nil {
		return 0, err
	}
	sum := 0.0
	for _, line := range strings.Split(string(text), "\n") {
		if !strings.HasPrefix(line, name+"{") {
			continue
		}
		matches := true
		for k, v := range labels {
			if !strings.Contains(line, fmt.Sprintf(`%s="%s"`, k, v)) {
				matches = false
			}
		}
		if matches {
			value, err := strconv.ParseFloat(line[strings.LastIndex(line, " ")+1:], 64)
			if err != nil {
				return 0, err
			}
			sum += value
		}
	}
	return sum, nil
}
