// Generates tests/vectors/deploy-request.json: a deploy and a stop request made as nex's Go client
// makes them (controlapi.NewDeployRequest / NewStopRequest, nex v0.2.7), with pinned keys.
//
// The wire struct, its JSON tags and the request flow are copied from nex's control-api/run.go and
// stop.go; the JWTs come from nats-io/jwt v2 and the seal is nkeys' xkv1 (box.Seal behind the
// "xkv1" prefix, as nkeys' xkeys.go does; Debian's nkeys 0.3 predates xkeys). Run it with Debian's
// packages (no network):
//
//	apt-get install golang-go golang-github-nats-io-jwt-dev golang-github-nats-io-nkeys-dev
//	cd tests/vectors/gen && GO111MODULE=off GOPATH=/usr/share/gocode go run . < inputs.json > ../deploy-request.json
package main

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"net/url"
	"os"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nkeys"
	"golang.org/x/crypto/nacl/box"
)

// DeployRequest is nex's controlapi.DeployRequest (v0.2.7), wire fields only.
type DeployRequest struct {
	Argv        []string `json:"argv,omitempty"`
	Description *string  `json:"description,omitempty"`
	Hash        *string  `json:"hash"`
	Location    *url.URL `json:"location"`
	Essential   *bool    `json:"essential,omitempty"`

	Environment *string `json:"environment"`

	ID *string `json:"id"`

	JsDomain *string `json:"jsdomain,omitempty"`

	RetryCount *uint      `json:"retry_count,omitempty"`
	RetriedAt  *time.Time `json:"retried_at,omitempty"`

	SenderPublicKey    *string                `json:"sender_public_key"`
	TargetNode         *string                `json:"target_node"`
	TriggerSubjects    []string               `json:"trigger_subjects,omitempty"`
	HostServicesConfig *NatsJwtConnectionInfo `json:"host_services,omitempty"`

	WorkloadName *string `json:"workload_name"`
	WorkloadJWT  *string `json:"workload_jwt"`
	WorkloadType string  `json:"type"`
}

type NatsJwtConnectionInfo struct {
	NatsUrl      string `json:"nats_url"`
	NatsUserJwt  string `json:"nats_user_jwt"`
	NatsUserSeed string `json:"nats_user_seed"`
}

type StopRequest struct {
	WorkloadId  string `json:"workload_id"`
	WorkloadJwt string `json:"workload_jwt"`
	TargetNode  string `json:"target_node"`
}

// Inputs are the pinned keys and values (the curve keys as raw hex beside their X... encodings).
type Inputs struct {
	IssuerSeed        string            `json:"issuer_seed"`
	SenderCurvePriv   string            `json:"sender_curve_private_hex"`
	SenderCurvePublic string            `json:"sender_public_xkey"`
	NodeCurvePubHex   string            `json:"node_curve_public_hex"`
	NodeID            string            `json:"node_id"`
	RequestID         string            `json:"request_id"`
	Location          string            `json:"location"`
	Name              string            `json:"name"`
	Hash              string            `json:"hash"`
	Description       string            `json:"description"`
	Argv              []string          `json:"argv"`
	Environment       map[string]string `json:"environment"`
	Essential         bool              `json:"essential"`
	StopWorkloadID    string            `json:"stop_workload_id"`

	// not used here: the node's and sender's keys as seeds, for the tests that replay the vector
	SenderXKeySeed string `json:"sender_xkey_seed"`
	NodeSeed       string `json:"node_seed"`
	NodeXKeySeed   string `json:"node_xkey_seed"`
	NodePublicXKey string `json:"node_public_xkey"`
}

func must(err error) {
	if err != nil {
		panic(err)
	}
}

// seal is nkeys' (*ckp).Seal: "xkv1" || nonce || box.Seal(input, nonce, recipient, sender).
func seal(input []byte, senderPriv, recipientPub *[32]byte) []byte {
	var nonce [24]byte
	_, err := rand.Read(nonce[:])
	must(err)
	out := append([]byte("xkv1"), nonce[:]...)
	return box.Seal(out, input, &nonce, recipientPub, senderPriv)
}

func key32(text string) *[32]byte {
	raw, err := hex.DecodeString(text)
	must(err)
	var out [32]byte
	copy(out[:], raw)
	return &out
}

func main() {
	var in Inputs
	must(json.NewDecoder(os.Stdin).Decode(&in))
	issuer, err := nkeys.FromSeed([]byte(in.IssuerSeed))
	must(err)

	// CreateWorkloadJWT(id, name, hash, issuer)
	claims := jwt.NewGenericClaims(in.RequestID)
	claims.Data["hash"] = in.Hash
	claims.Data["name"] = in.Name
	token, err := claims.Encode(issuer)
	must(err)

	// EncryptRequestEnvironment(senderXKey, recipientPublicKey, env)
	jsonEnv, _ := json.Marshal(in.Environment)
	env := base64.StdEncoding.EncodeToString(seal(jsonEnv, key32(in.SenderCurvePriv), key32(in.NodeCurvePubHex)))

	location, err := url.Parse(in.Location)
	must(err)
	workloadType := "native"
	request := &DeployRequest{
		Argv:            in.Argv,
		Description:     &in.Description,
		Environment:     &env,
		Essential:       &in.Essential,
		ID:              &in.RequestID,
		Location:        location,
		SenderPublicKey: &in.SenderCurvePublic,
		TargetNode:      &in.NodeID,
		WorkloadJWT:     &token,
		WorkloadName:    &in.Name,
		WorkloadType:    workloadType,
	}
	deploy, err := json.Marshal(request)
	must(err)

	// NewStopRequest(workloadId, name, targetNode, issuer), a second later (a stop JWT issued in the
	// deploy's second would be refused as a replay)
	time.Sleep(time.Until(time.Now().Truncate(time.Second).Add(time.Second)))
	stopClaims := jwt.NewGenericClaims(in.Name)
	stopToken, err := stopClaims.Encode(issuer)
	must(err)
	stop, err := json.Marshal(&StopRequest{WorkloadId: in.StopWorkloadID, TargetNode: in.NodeID, WorkloadJwt: stopToken})
	must(err)

	out := map[string]interface{}{
		"inputs":         in,
		"deploy_request": string(deploy),
		"stop_request":   string(stop),
		"generated_by":   "tests/vectors/gen (Go " + goVersion() + ", nats-io/jwt v2, x/crypto nacl/box)",
	}
	encoder := json.NewEncoder(os.Stdout)
	encoder.SetIndent("", "  ")
	must(encoder.Encode(out))
}
