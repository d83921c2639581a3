# Please fill in the following configuration according to the actual situation
# AWS AK (or any other account shape of the user's page: role, MFA, instance role)
account = {
    "ak_id"    : "<AWS AK ID>",
    "ak_secret": "<AWS AK SECRET>",
}

# collector configuration
ec2_configs = {
    'regions': ['cn-northwest-1']
}
cloudwatch_configs = {
    'regions': ['cn-northwest-1'],
    'targets': [{'namespace': 'AWS/EC2', 'metrics': 'ALL'}],
}

###### Do not modify the following content #####
from integration_core__runner import Runner
import integration_aws_ec2__main as aws_ec2
import integration_aws_cloudwatch__main as aws_cloudwatch

# Every 5 minutes: a 300 s CloudWatch bucket closes each time; EC2 collects
# every third run (its 15-minute skip). CloudWatch comes last: its metrics
# take the tags of the instances EC2 collected.
@DFF.API('AWS-EC2 Collection with metrics', timeout=240, fixed_crontab='*/5 * * * *')
def run():
    Runner([
        aws_ec2.DataCollector(account, ec2_configs),
        aws_cloudwatch.DataCollector(account, cloudwatch_configs),
    ]).run()
