// Command karpenter-kwok runs Karpenter core with its KWOK cloud provider against a kubetune
// local cluster. It is upstream's sigs.k8s.io/karpenter/kwok main plus one change: the
// instance-type catalog (--instance-types-file-path / INSTANCE_TYPES_FILE_PATH, kwok's own
// JSON format) may mark an offering `"Available": false`, which upstream's loader overrides
// to true. An instance type whose offerings are all unavailable is how a launch failure is
// injected: Karpenter then finds no offering for the pods that need it.
//
// Built by kubetune_local.karpenter from a generated wrapper module that requires
// sigs.k8s.io/karpenter at the pinned version; this file is copied into it verbatim.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"

	"sigs.k8s.io/controller-runtime/pkg/log"

	kwok "sigs.k8s.io/karpenter/kwok/cloudprovider"
	kwokoptions "sigs.k8s.io/karpenter/kwok/options"
	"sigs.k8s.io/karpenter/pkg/cloudprovider"
	"sigs.k8s.io/karpenter/pkg/cloudprovider/overlay"
	"sigs.k8s.io/karpenter/pkg/controllers"
	"sigs.k8s.io/karpenter/pkg/controllers/state"
	"sigs.k8s.io/karpenter/pkg/operator"
)

// catalogEntry is the part of kwok's instance-type JSON this main reads a second time: which
// offerings the catalog declares unavailable ("Available": false; absent means available).
type catalogEntry struct {
	Name      string `json:"name"`
	Offerings []struct {
		Available *bool `json:"Available"`
	} `json:"offerings"`
}

// applyAvailability restores the catalog's "Available": false, offering by offering, in order.
func applyAvailability(ctx context.Context, instanceTypes []*cloudprovider.InstanceType) error {
	opts := kwokoptions.FromContext(ctx)
	if opts == nil || opts.InstanceTypesFilePath == "" {
		return nil
	}
	raw, err := os.ReadFile(opts.InstanceTypesFilePath)
	if err != nil {
		return fmt.Errorf("reading %s: %w", opts.InstanceTypesFilePath, err)
	}
	var entries []catalogEntry
	if err := json.Unmarshal(raw, &entries); err != nil {
		return fmt.Errorf("parsing %s: %w", opts.InstanceTypesFilePath, err)
	}
	byName := make(map[string]*cloudprovider.InstanceType, len(instanceTypes))
	for _, it := range instanceTypes {
		byName[it.Name] = it
	}
	for _, entry := range entries {
		it, ok := byName[entry.Name]
		if !ok {
			continue
		}
		for i, offering := range entry.Offerings {
			if i < len(it.Offerings) && offering.Available != nil && !*offering.Available {
				it.Offerings[i].Available = false
				log.FromContext(ctx).Info("offering marked unavailable by the catalog",
					"instance-type", it.Name, "offering", it.Offerings[i].Requirements.String())
			}
		}
	}
	return nil
}

func main() {
	ctx, op := operator.NewOperator()
	instanceTypes, err := kwok.ConstructInstanceTypes(ctx)
	if err != nil {
		log.FromContext(ctx).Error(err, "failed constructing instance types")
		os.Exit(1)
	}
	if err := applyAvailability(ctx, instanceTypes); err != nil {
		log.FromContext(ctx).Error(err, "failed applying the catalog's availability")
		os.Exit(1)
	}

	undecorated := kwok.NewCloudProvider(ctx, op.GetClient(), instanceTypes)
	cloudProvider := overlay.Decorate(undecorated, op.GetClient(), op.InstanceTypeStore)
	clusterState := state.NewCluster(op.Clock, op.GetClient(), cloudProvider)
	op.
		WithControllers(ctx, controllers.NewControllers(
			ctx,
			op.Manager,
			op.Clock,
			op.GetClient(),
			op.EventRecorder,
			cloudProvider,
			undecorated,
			clusterState,
			op.InstanceTypeStore,
		)...).Start(ctx)
}
