// kstatus-check: the status that kstatus (sigs.k8s.io/cli-utils/pkg/kstatus/status),
// the library behind Flux's health checks, computes for Kubernetes objects.
// It reads a JSON array of objects on stdin and writes a JSON array of
// {"status": "Current" | "InProgress" | "Failed" | ..., "message": ...}, one per object.
package main

import (
	"encoding/json"
	"fmt"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type verdict struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

func main() {
	var objects []json.RawMessage
	if err := json.NewDecoder(os.Stdin).Decode(&objects); err != nil {
		fmt.Fprintln(os.Stderr, "kstatus-check: stdin is not a JSON array:", err)
		os.Exit(2)
	}
	verdicts := make([]verdict, 0, len(objects))
	for _, raw := range objects {
		// UnmarshalJSON keeps integers int64, as the API machinery reads them.
		object := &unstructured.Unstructured{}
		if err := object.UnmarshalJSON(raw); err != nil {
			verdicts = append(verdicts, verdict{"Error", err.Error()})
			continue
		}
		result, err := status.Compute(object)
		if err != nil {
			verdicts = append(verdicts, verdict{"Error", err.Error()})
			continue
		}
		verdicts = append(verdicts, verdict{result.Status.String(), result.Message})
	}
	if err := json.NewEncoder(os.Stdout).Encode(verdicts); err != nil {
		fmt.Fprintln(os.Stderr, "kstatus-check:", err)
		os.Exit(1)
	}
}
