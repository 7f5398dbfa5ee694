// Command karpenter-kwok runs Karpenter core with its KWOK cloud provider against a kubetune
// local cluster. It is upstream's sigs.k8s.io/karpenter/kwok main plus one change: the
// instance-type catalog (--instance-types-file-path / INSTANCE_TYPES_FILE_PATH, kwok's own
// JSON format) may mark an offering `"Available": false`, which upstream's loader overrides
// to true. An instance type whose offerings are all unavailable is how a launch failure is
// injected: Karpenter then finds no offering for the pods that need it.
//
// The provider is wrapped (see failingProvider) for three reasons: upstream's KWOK Create panics
// on a claim whose instance types have no available offering (a static NodePool creates such
// claims without checking), and the stall that panic causes blocks all provisioning; tests
// inject launch failures through the ConfigMap kube-system/kubetune-local-instance-failures
// ("<instance type>: <Reason>: <message>"), read on every launch; and a terminated instance's
// Node must go, as a cloud's node controller (CCM) removes it: Karpenter deletes the Node of a
// claim itself only once the claim is registered, and upstream KWOK's Delete leaves the Node of a
// claim deleted before that (a job deleted while its nodes boot) behind forever.
//
// Built by kubetune_local.karpenter from a generated wrapper module that requires
// sigs.k8s.io/karpenter at the pinned version; this file is copied into it verbatim.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/log"

	kwok "sigs.k8s.io/karpenter/kwok/cloudprovider"
	kwokoptions "sigs.k8s.io/karpenter/kwok/options"
	"sigs.k8s.io/karpenter/pkg/cloudprovider"
	"sigs.k8s.io/karpenter/pkg/cloudprovider/overlay"
	"sigs.k8s.io/karpenter/pkg/controllers"
	"sigs.k8s.io/karpenter/pkg/controllers/state"
	"sigs.k8s.io/karpenter/pkg/operator"
	"sigs.k8s.io/karpenter/pkg/scheduling"

	karpv1 "sigs.k8s.io/karpenter/pkg/apis/v1"
)

// failuresConfigMap maps an instance type to "Reason: message"; Reason InsufficientCapacity is
// reported as Karpenter's insufficient-capacity error (the claim is deleted, an event says why),
// any other as a launch error (the claim stays, Launched=Unknown with that reason and message).
var failuresConfigMap = types.NamespacedName{Namespace: "kube-system", Name: "kubetune-local-instance-failures"}

type failingProvider struct {
	cloudprovider.CloudProvider
	kubeClient    client.Client
	instanceTypes map[string]*cloudprovider.InstanceType
}

func (p *failingProvider) Create(ctx context.Context, nodeClaim *karpv1.NodeClaim) (*karpv1.NodeClaim, error) {
	var names []string
	for _, r := range nodeClaim.Spec.Requirements {
		if r.Key == corev1.LabelInstanceTypeStable && r.Operator == corev1.NodeSelectorOpIn {
			names = r.Values
		}
	}
	if err := p.injected(ctx, names); err != nil {
		return nil, err
	}
	requirements := scheduling.NewNodeSelectorRequirementsWithMinValues(nodeClaim.Spec.Requirements...)
	for _, name := range names {
		if it, ok := p.instanceTypes[name]; ok && len(it.Offerings.Available().Compatible(requirements)) > 0 {
			return p.CloudProvider.Create(ctx, nodeClaim)
		}
	}
	return nil, cloudprovider.NewInsufficientCapacityError(
		fmt.Errorf("no available offering for instance types %s in the catalog", strings.Join(names, ", ")))
}

// Delete terminates the claim's instance, as upstream KWOK does, and then does what a cloud's
// node controller does when an instance is gone: it deletes the instance's Node object.
func (p *failingProvider) Delete(ctx context.Context, nodeClaim *karpv1.NodeClaim) error {
	err := p.CloudProvider.Delete(ctx, nodeClaim)
	if name := strings.TrimPrefix(nodeClaim.Status.ProviderID, "kwok://"); name != "" && name != nodeClaim.Status.ProviderID {
		node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}}
		if derr := p.kubeClient.Delete(ctx, node); derr != nil && !apierrors.IsNotFound(derr) {
			return fmt.Errorf("deleting the Node %s of terminated instance %s: %w", name, nodeClaim.Name, derr)
		}
	}
	return err
}

// injected returns the configured failure when every candidate instance type has one.
func (p *failingProvider) injected(ctx context.Context, names []string) error {
	if len(names) == 0 {
		return nil
	}
	cm := &corev1.ConfigMap{}
	if err := p.kubeClient.Get(ctx, failuresConfigMap, cm); err != nil {
		if apierrors.IsNotFound(err) {
			return nil
		}
		return fmt.Errorf("reading %s: %w", failuresConfigMap, err)
	}
	var first string
	for _, name := range names {
		entry, ok := cm.Data[name]
		if !ok || strings.TrimSpace(entry) == "" {
			return nil
		}
		if first == "" {
			first = entry
		}
	}
	reason, message, _ := strings.Cut(first, ":")
	reason, message = strings.TrimSpace(reason), strings.TrimSpace(message)
	if message == "" {
		message = reason
	}
	if reason == "InsufficientCapacity" {
		return cloudprovider.NewInsufficientCapacityError(errors.New(message))
	}
	return cloudprovider.NewCreateError(errors.New(message), reason, message)
}

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

	byName := make(map[string]*cloudprovider.InstanceType, len(instanceTypes))
	for _, it := range instanceTypes {
		byName[it.Name] = it
	}
	undecorated := &failingProvider{
		CloudProvider: kwok.NewCloudProvider(ctx, op.GetClient(), instanceTypes),
		kubeClient:    op.GetClient(),
		instanceTypes: byName,
	}
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
