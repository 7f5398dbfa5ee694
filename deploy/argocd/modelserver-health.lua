-- Argo CD health check for kubetune.io/ModelServer (status written by the kubetune operator).
local hs = {}
if obj.status == nil or obj.status.phase == nil then
  hs.status = "Progressing"
  hs.message = "waiting for the kubetune operator"
  return hs
end
local ready = nil
if obj.status.conditions ~= nil then
  for _, c in ipairs(obj.status.conditions) do
    if c.type == "Ready" then
      ready = c
    end
  end
end
local message = ""
if ready ~= nil and ready.message ~= nil then
  message = ready.message
end
if obj.metadata.generation ~= nil and obj.status.observedGeneration ~= nil
    and obj.status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "the operator has not seen the latest spec yet"
elseif obj.status.phase == "Ready" then
  hs.status = "Healthy"
  hs.message = message
elseif obj.spec ~= nil and obj.spec.replicas == 0 then
  hs.status = "Suspended"
  hs.message = "spec.replicas is 0"
else
  hs.status = "Progressing"
  hs.message = message
end
return hs
