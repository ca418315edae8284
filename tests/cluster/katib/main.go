// katib-metrics: what Katib's File metrics collector reads from a metrics file.
// Usage: katib-metrics FILE FORMAT METRIC [METRIC...]  (FORMAT: TEXT or JSON; the first
// metric is the objective). Writes the observation log as JSON: the same parser the
// collector sidecar runs before it reports to Katib's database.
package main

import (
	"encoding/json"
	"fmt"
	"os"

	common "github.com/kubeflow/katib/pkg/apis/controller/common/v1beta1"
	collector "github.com/kubeflow/katib/pkg/metricscollector/v1beta1/file-metricscollector"
)

func main() {
	if len(os.Args) < 4 {
		fmt.Fprintln(os.Stderr, "usage: katib-metrics FILE TEXT|JSON METRIC [METRIC...]")
		os.Exit(2)
	}
	format := common.FileFormat(os.Args[2])
	log, err := collector.CollectObservationLog(os.Args[1], os.Args[3:], nil, format)
	if err != nil {
		fmt.Fprintln(os.Stderr, "katib-metrics:", err)
		os.Exit(1)
	}
	if err := json.NewEncoder(os.Stdout).Encode(log); err != nil {
		fmt.Fprintln(os.Stderr, "katib-metrics:", err)
		os.Exit(1)
	}
}
