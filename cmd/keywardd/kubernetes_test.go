package main

import (
	"bytes"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/keyward/keyward/daemon"
	"github.com/keyward/keyward/daemon/policy"
	"github.com/keyward/keyward/daemon/server"
)

// TestKubernetesManifests: docs/kubernetes/keyward-sidecar.yaml decodes
// strictly into the Kubernetes API's types, and holds together: keywardd's
// configuration and policy parse as keywardd reads them; keywardd is a
// native sidecar (an init container that keeps running); the socket is on
// a volume both containers mount, in a directory keywardd makes; the app
// reaches it through the socket's group; the policy binds the app's uid
// and keywardd's own (its startup probe); the PIN and etcd's certificates
// come from Secrets mounted into keywardd alone, readable by its group and
// by no one else; the process namespace is shared so that keywardd sees
// the app's binary.
func TestKubernetesManifests(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("..", "..", "docs", "kubernetes", "keyward-sidecar.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var (
		cm     corev1.ConfigMap
		secret corev1.Secret
		dep    appsv1.Deployment
		kinds  []string
	)
	for _, doc := range bytes.Split(b, []byte("\n---\n")) {
		var meta struct{ Kind string }
		if err := yaml.Unmarshal(doc, &meta); err != nil {
			t.Fatal(err)
		}
		kinds = append(kinds, meta.Kind)
		var into any
		switch meta.Kind {
		case "ConfigMap":
			into = &cm
		case "Secret":
			into = &secret
		case "Deployment":
			into = &dep
		default:
			t.Fatalf("a document of kind %q", meta.Kind)
		}
		if err := yaml.UnmarshalStrict(doc, into); err != nil {
			t.Fatalf("%s: %v", meta.Kind, err)
		}
	}
	if strings.Join(kinds, " ") != "ConfigMap Secret Deployment" {
		t.Fatalf("documents: %v", kinds)
	}

	// keywardd's configuration and policy, as keywardd reads them.
	dir := t.TempDir()
	cfgFile := filepath.Join(dir, "keywardd.yaml")
	if err := os.WriteFile(cfgFile, []byte(cm.Data["keywardd.yaml"]), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := daemon.LoadConfig(cfgFile)
	if err != nil {
		t.Fatalf("keywardd.yaml: %v", err)
	}
	pol, err := policy.Parse([]byte(cm.Data["policy.yaml"]), server.Ops())
	if err != nil {
		t.Fatalf("policy.yaml: %v", err)
	}

	pod := dep.Spec.Template.Spec
	if len(pod.InitContainers) != 1 || len(pod.Containers) != 1 {
		t.Fatalf("%d init containers, %d containers; want keywardd and the app", len(pod.InitContainers), len(pod.Containers))
	}
	kw, app := pod.InitContainers[0], pod.Containers[0]
	if kw.RestartPolicy == nil || *kw.RestartPolicy != corev1.ContainerRestartPolicyAlways {
		t.Errorf("keywardd is not a native sidecar (restartPolicy: Always)")
	}
	if pod.ShareProcessNamespace == nil || !*pod.ShareProcessNamespace {
		t.Errorf("the process namespace is not shared: keywardd cannot see the app's pid, nor its binary")
	}
	if len(kw.Command) != 3 || path.Base(kw.Command[0]) != "keywardd" || kw.Command[1] != "-config" {
		t.Errorf("keywardd's command: %v", kw.Command)
	}
	cfgPath := "/etc/keyward/config/keywardd.yaml"
	if len(kw.Command) == 3 {
		cfgPath = kw.Command[2]
	}
	mount := func(c corev1.Container, file string) *corev1.VolumeMount {
		for i, m := range c.VolumeMounts {
			if strings.HasPrefix(file, m.MountPath+"/") {
				return &c.VolumeMounts[i]
			}
		}
		return nil
	}
	volume := func(name string) *corev1.Volume {
		for i := range pod.Volumes {
			if pod.Volumes[i].Name == name {
				return &pod.Volumes[i]
			}
		}
		t.Fatalf("no volume %q", name)
		return nil
	}
	if m := mount(kw, cfgPath); m == nil || volume(m.Name).ConfigMap == nil || volume(m.Name).ConfigMap.Name != cm.Name || path.Base(cfgPath) != "keywardd.yaml" {
		t.Errorf("keywardd's -config is not on the ConfigMap %s", cm.Name)
	}
	if m := mount(kw, cfg.PolicyFile); m == nil || volume(m.Name).ConfigMap == nil {
		t.Errorf("policy_file %s is not on the ConfigMap", cfg.PolicyFile)
	}

	// The socket: on a volume both mount at the same path, in a directory
	// keywardd makes (the volume's own is 0777, which keywardd refuses).
	km, am := mount(kw, cfg.Socket.Path), mount(app, cfg.Socket.Path)
	if km == nil || am == nil || km.Name != am.Name || km.MountPath != am.MountPath || volume(km.Name).EmptyDir == nil {
		t.Fatalf("the socket %s is not on an emptyDir both containers mount alike", cfg.Socket.Path)
	}
	if !am.ReadOnly || km.ReadOnly {
		// The volume is open to all (and setgid with fsGroup, not sticky):
		// an app that can write it can rename keywardd's directory away.
		t.Errorf("the socket's volume: the app's mount must be read-only (connect needs no write to the file system), keywardd's writable")
	}
	if path.Dir(cfg.Socket.Path) == km.MountPath {
		t.Errorf("the socket is at the volume's top, whose mode keywardd refuses; put it in a directory keywardd makes")
	}
	if env := app.Env; !slices.ContainsFunc(env, func(e corev1.EnvVar) bool { return e.Name == "KEYWARD_SOCKET" && e.Value == cfg.Socket.Path }) {
		t.Errorf("the app's KEYWARD_SOCKET is not %s", cfg.Socket.Path)
	}
	gid, err := strconv.ParseInt(cfg.Socket.Group, 10, 64)
	if cfg.Socket.Mode != "0660" || err != nil || pod.SecurityContext == nil || !slices.Contains(pod.SecurityContext.SupplementalGroups, gid) {
		t.Errorf("socket mode %s group %q: the app cannot reach it through the pod's supplemental groups", cfg.Socket.Mode, cfg.Socket.Group)
	}

	// Who calls: the app's uid and binary, and keywardd's own for its probe.
	appUID := app.SecurityContext.RunAsUser
	kwUID := kw.SecurityContext.RunAsUser
	if appUID == nil || kwUID == nil || *appUID == *kwUID {
		t.Fatalf("the app and keywardd must run as users of their own")
	}
	// keywardd, another user without capabilities, cannot read the app's
	// /proc/PID/exe: the app comes as its uid alone, no binary.
	sub := policy.Subject{UID: uint32(*appUID), GIDs: []uint32{uint32(*app.SecurityContext.RunAsGroup)}}
	if err := pol.Allow(sub, "EnvelopeService.Decrypt", "orders-eu"); err != nil {
		t.Errorf("the policy does not let the app (as keywardd sees it: uid %d, no binary) decrypt with orders-*: %v", *appUID, err)
	}
	if err := pol.Allow(policy.Subject{UID: uint32(*appUID) + 1}, "EnvelopeService.Decrypt", "orders-eu"); err == nil {
		t.Errorf("the policy lets another uid decrypt")
	}
	if err := pol.Allow(policy.Subject{UID: uint32(*kwUID)}, "StatusService.GetStatus", ""); err != nil {
		t.Errorf("keywardd's startup probe (keyward status as uid %d) is not granted: %v", *kwUID, err)
	}
	if p := kw.StartupProbe; p == nil || p.Exec == nil || !slices.Contains(p.Exec.Command, cfg.Socket.Path) {
		t.Errorf("keywardd's startup probe does not ask keywardd on its socket")
	}
	for _, c := range []corev1.Container{kw, app} {
		sc := c.SecurityContext
		if sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation ||
			sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem || sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Drop, "ALL") {
			t.Errorf("%s: not locked down (non-root, no escalation, read-only root, no capabilities)", c.Name)
		}
	}

	// Secrets: mounted into keywardd alone, readable by its group (the
	// pod's fsGroup) and by no one else: keywardd refuses a PIN file that
	// others may read.
	for _, file := range []string{cfg.HSM.PINFile, cfg.Store.Etcd.TLS.CA, cfg.Store.Etcd.TLS.Cert, cfg.Store.Etcd.TLS.Key} {
		m := mount(kw, file)
		if m == nil || volume(m.Name).Secret == nil {
			t.Errorf("%s is not on a Secret mounted into keywardd", file)
			continue
		}
		if mount(app, file) != nil {
			t.Errorf("the app mounts %s", file)
		}
		v := volume(m.Name).Secret
		if v.DefaultMode == nil {
			t.Errorf("%s: no defaultMode (0644: others could read it)", file)
		} else if *v.DefaultMode&0o007 != 0 || *v.DefaultMode&0o040 == 0 {
			t.Errorf("%s: mode %04o; want readable by the group, by no one else", file, *v.DefaultMode)
		}
	}
	if sc := pod.SecurityContext; sc.FSGroup == nil || kw.SecurityContext.RunAsGroup == nil || *sc.FSGroup != *kw.SecurityContext.RunAsGroup {
		t.Errorf("the pod's fsGroup is not keywardd's group: keywardd cannot read the Secrets' files")
	}
	if m := mount(kw, cfg.HSM.PINFile); m != nil && volume(m.Name).Secret.SecretName != secret.Name {
		t.Errorf("the PIN is not from the Secret %s", secret.Name)
	}
	if _, ok := secret.StringData["pin"]; !ok || path.Base(cfg.HSM.PINFile) != "pin" {
		t.Errorf("the Secret's key and pin_file's name differ")
	}
	if m := mount(kw, cfg.DataDir+"/x"); m == nil || m.ReadOnly {
		t.Errorf("data_dir %s is not on a writable volume", cfg.DataDir)
	}
}
