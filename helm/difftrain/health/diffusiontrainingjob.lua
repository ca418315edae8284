-- Argo CD health of a DiffusionTrainingJob (difftrain.io/v1alpha1).
-- The body of argocd-cm's key resource.customizations.health.difftrain.io_DiffusionTrainingJob:
-- Argo CD runs it with the object in `obj` and reads the table it returns.
--   Succeeded                      -> Healthy
--   Failed                         -> Degraded, with the failure's reason and message
--   Suspended                      -> Suspended
--   Pending, Running, Restarting   -> Progressing, saying what the job waits for or does
-- A job the operator has not seen yet (no status, or an older observedGeneration) is
-- Progressing.
local health = {}

local function condition(kind)
  if obj.status == nil or obj.status.conditions == nil then
    return nil
  end
  for _, found in ipairs(obj.status.conditions) do
    if found.type == kind then
      return found
    end
  end
  return nil
end

-- "Reason: message" of the condition that tells the phase, else the status's reason.
local function said(kinds)
  for _, kind in ipairs(kinds) do
    local found = condition(kind)
    if found ~= nil and found.status == "True" then
      if found.message ~= nil and found.message ~= "" then
        return found.reason .. ": " .. found.message
      end
      return found.reason
    end
  end
  return obj.status.reason or obj.status.phase
end

if obj.status == nil or obj.status.phase == nil then
  health.status = "Progressing"
  health.message = "Waiting for the difftrain operator"
  return health
end

local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and observed ~= nil and observed < generation then
  health.status = "Progressing"
  health.message = "Waiting for the operator to see generation " .. generation
  return health
end

local phase = obj.status.phase
if phase == "Succeeded" then
  health.status = "Healthy"
  health.message = said({"Succeeded"})
elseif phase == "Failed" then
  health.status = "Degraded"
  health.message = said({"Failed"})
elseif phase == "Suspended" then
  health.status = "Suspended"
  health.message = said({"Suspended"})
elseif phase == "Running" then
  health.status = "Progressing"
  local progress = obj.status.progress
  if progress ~= nil and progress.step ~= nil and progress.totalSteps ~= nil then
    health.message = "Training: step " .. progress.step .. "/" .. progress.totalSteps
    if progress.percent ~= nil then
      health.message = health.message .. " (" .. progress.percent .. "%)"
    end
  else
    health.message = said({"Running"})
  end
elseif phase == "Restarting" then
  health.status = "Progressing"
  health.message = said({"Restarting"})
else
  -- Pending: what the attempt waits for (a False Running or Created condition's reason).
  health.status = "Progressing"
  local reason = obj.status.reason
  local message = nil
  for _, kind in ipairs({"Unschedulable", "Suspended", "Running", "Created"}) do
    local found = condition(kind)
    if found ~= nil and found.reason == reason and found.message ~= nil and found.message ~= "" then
      message = found.message
      break
    end
  end
  if reason ~= nil and reason ~= "" and message ~= nil then
    health.message = reason .. ": " .. message
  else
    health.message = reason or "Pending"
  end
end
return health
