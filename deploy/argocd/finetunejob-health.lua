-- Argo CD health check for kubetune.io/FineTuneJob (status written by the kubetune operator).
local function condition(status, kind)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function text(value)
  if type(value) == "number" and value == math.floor(value) then
    return tostring(math.floor(value))
  end
  return tostring(value)
end

local function message_of(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  return fallback
end

hs = {}
local status = obj.status
local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end
if status == nil or status.phase == nil or status.observedGeneration == nil
    or (generation ~= nil and status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "waiting for the operator"
  return hs
end

local phase = status.phase
if phase == "Failed" then
  local failed = condition(status, "Failed")
  hs.status = "Degraded"
  hs.message = "Failed"
  if failed ~= nil then
    local reason = failed.reason or "Failed"
    if failed.message ~= nil and failed.message ~= "" then
      hs.message = reason .. ": " .. failed.message
    else
      hs.message = reason
    end
  end
elseif phase == "Complete" then
  hs.status = "Healthy"
  hs.message = message_of(condition(status, "Complete"), "Complete")
elseif phase == "Serving" then
  local ready = condition(status, "ServingReady")
  if ready ~= nil and ready.status == "True" then
    hs.status = "Healthy"
    if status.endpoint ~= nil and status.endpoint.url ~= nil then
      hs.message = "serving " .. status.endpoint.url
    else
      hs.message = "serving"
    end
  else
    hs.status = "Progressing"
    hs.message = message_of(ready, "waiting for the server to be ready")
  end
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = message_of(condition(status, "Suspended"), "Suspended")
elseif phase == "Training" then
  hs.status = "Progressing"
  hs.message = "Training"
  local p = status.progress
  if p ~= nil and p.step ~= nil then
    local m = "step " .. text(p.step)
    if p.totalSteps ~= nil then
      m = m .. "/" .. text(p.totalSteps)
    end
    if p.percent ~= nil then
      m = m .. " (" .. text(p.percent) .. "%)"
    end
    if p.loss ~= nil then
      m = m .. ", loss " .. string.format("%.4g", p.loss)
    end
    hs.message = m
  end
elseif phase == "Preflight" then
  hs.status = "Progressing"
  hs.message = message_of(condition(status, "PreflightPassed"), "Preflight")
elseif phase == "Queued" then
  hs.status = "Progressing"
  hs.message = message_of(condition(status, "Training"), "Queued")
elseif phase == "Provisioning" then
  hs.status = "Progressing"
  hs.message = message_of(condition(status, "NodesReady"), "Provisioning")
else
  hs.status = "Progressing"
  hs.message = phase
end
return hs
