# expect: the title must be a non-empty string
account = {"ak_id": "AKIAEXAMPLE000000001", "ak_secret": "SENTINELakSecret0000000000000000000000000"}
collector_configs = {'regions': ['us-east-1']}
from integration_core__runner import Runner
import integration_aws_ec2__main as main
@DFF.API('', timeout=60)
def run():
    pass
